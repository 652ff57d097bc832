"""Generation: one loop over sub-pixels in raster order (R, then G, then B of each pixel) for every
architecture.

A *stepper* returns the logits of the next sub-pixel given the image generated so far. The naive
stepper runs the whole network each time (H * W * C passes); cached steppers reuse earlier work.
Sampling draws each sub-pixel by inverting the CDF at a uniform number fixed in advance, so two
steppers that compute the same logits give exactly the same images from the same noise.
"""

from collections.abc import Callable

import torch


def categorical_from_uniform(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sample (B,) levels from logits (B, K) at temperature T, using uniform numbers u (B,) in [0, 1)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
    return (cdf < u.double()[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)


class NaiveStepper:
    """The reference: a full network pass per sub-pixel."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def logits(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        return self.net(x)[:, :, c, i, j]


def make_stepper(net: torch.nn.Module, method: str):
    if method == "naive":
        return NaiveStepper(net)
    if method == "cached":
        if not hasattr(net, "cached_stepper"):
            raise ValueError(f"{type(net).__name__} has no cached sampler; use method=naive")
        return net.cached_stepper()
    raise ValueError(f"unknown sampling method {method!r}; choose cached or naive")


@torch.no_grad()
def generate(
    net: torch.nn.Module,
    noise: torch.Tensor,
    num_levels: int,
    temperature: float = 1.0,
    method: str = "cached",
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    on_row: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate images of integer levels (B, C, H, W).

    ``noise``: uniform numbers (B, C, H, W), one per sub-pixel, which fix the samples. ``known`` and
    ``known_mask`` (bool, same shape): sub-pixels taken as given instead of sampled (completion).
    ``on_row(i)`` is called after each finished row (progress bars).
    """
    batch, channels, height, width = noise.shape
    stepper = make_stepper(net, method)
    levels = torch.zeros(noise.shape, dtype=torch.long, device=noise.device)
    x = torch.zeros(noise.shape, dtype=next(net.parameters()).dtype, device=noise.device)
    if known is not None:
        known = known.to(noise.device).long()
        known_mask = known_mask.to(noise.device).bool()
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                new = categorical_from_uniform(stepper.logits(x, i, j, c), noise[:, c, i, j], temperature)
                if known is not None:
                    new = torch.where(known_mask[:, c, i, j], known[:, c, i, j], new)
                levels[:, c, i, j] = new
                x[:, c, i, j] = new.to(x.dtype) / (num_levels - 1)
        if on_row is not None:
            on_row(i)
    return levels
