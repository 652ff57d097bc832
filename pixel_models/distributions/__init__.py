"""Output distributions over the K levels of a sub-pixel, chosen with ``model.output`` (``name`` and its
settings).

A distribution owns the number of parameter maps the network outputs per pixel (``num_params``) and their
colour groups (``param_groups()``, for the output layer's mask), the per-image NLL used in training and
evaluation (``nll``), the (B, K, C, H, W) logits of the LightningModule's contract (``log_probs``), and the
K-level logits of one sub-pixel given the pixel's earlier colours (``logits_at``), which sampling and
completion use.
"""

from pixel_models.distributions.categorical import Categorical

DISTRIBUTIONS = {
    "categorical": Categorical,
}


def build_distribution(output: dict | None, num_channels: int, num_levels: int):
    """The distribution named by ``output["name"]`` (default: categorical), with its plain settings."""
    output = dict(output or {"name": "categorical"})
    name = output.pop("name", "categorical")
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown output {name!r}; choose one of {sorted(DISTRIBUTIONS)} (model.output.name)"
        )
    try:
        return DISTRIBUTIONS[name](num_channels=num_channels, num_levels=num_levels, **output)
    except TypeError as err:
        raise ValueError(f"model.output: {err}") from None
