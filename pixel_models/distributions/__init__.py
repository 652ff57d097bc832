"""Output distributions over the K levels of a sub-pixel, chosen with ``model.output`` (``name`` and its
settings).

A distribution owns the number of parameter maps the network outputs per pixel (``num_params``) and their
colour groups (``param_groups()``, for the output layer's mask), the per-image NLL used in training and
evaluation (``nll``), the (B, K, C, H, W) logits of the LightningModule's contract (``log_probs``), and the
K-level logits of one sub-pixel given the pixel's earlier colours (``logits_at``), which sampling and
completion use.
"""

import inspect

from pixel_models.distributions.categorical import Categorical
from pixel_models.distributions.logistic_mixture import LogisticMixture

DISTRIBUTIONS = {
    "categorical": Categorical,
    "logistic_mixture": LogisticMixture,
}


def settings_of(distribution_class) -> set[str]:
    """The settings (keyword arguments beyond num_channels / num_levels) a distribution takes."""
    names = inspect.signature(distribution_class).parameters
    return set(names) - {"num_channels", "num_levels"}


def build_distribution(output: dict | None, num_channels: int, num_levels: int):
    """The distribution named by ``output["name"]`` (default: categorical), with its plain settings.

    The shared config carries every distribution's settings (``model.output.num_mixtures`` is there for
    the logistic mixture), so that ``model.output.name=<name>`` alone switches: settings of another
    registered distribution are left out; a setting no distribution takes is an error."""
    output = dict(output or {"name": "categorical"})
    name = output.pop("name", "categorical")
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown output {name!r}; choose one of {sorted(DISTRIBUTIONS)} (model.output.name)"
        )
    known = set().union(*(settings_of(cls) for cls in DISTRIBUTIONS.values()))
    unknown = sorted(set(output) - known)
    if unknown:
        raise ValueError(
            f"model.output.{unknown[0]} is not a setting of any output distribution; "
            f"settings: {sorted(known)}"
        )
    own = settings_of(DISTRIBUTIONS[name])
    output = {key: value for key, value in output.items() if key in own}
    try:
        return DISTRIBUTIONS[name](num_channels=num_channels, num_levels=num_levels, **output)
    except TypeError as err:
        raise ValueError(f"model.output: {err}") from None
