"""Explicit builders from the composed Hydra config: only the project's own config nodes reach
``instantiate`` (never anything read from a file)."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig


def build(node: DictConfig, **kwargs):
    """``instantiate``, but a constructor's own error (a clear one-line message) reaches the user as is."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def build_all(group: DictConfig | None) -> list:
    """Every non-null entry of a config group (e.g. ``callbacks``), built."""
    return [build(item) for item in (group or {}).values() if item is not None]
