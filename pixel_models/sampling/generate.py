"""Generation: one loop over sub-pixels in raster order (R, then G, then B of each pixel) for every
architecture.

A *stepper* returns the network's output parameters at the next sub-pixel's pixel given the image
generated so far; the network's output distribution (``net.distribution.logits_at``) turns them into the
K-level logits of that sub-pixel given the pixel's earlier colours. The naive stepper runs the whole
network each time (H * W * C passes); cached steppers (``net.cached_stepper(label)``, e.g.
``pixelcnn.CachedPixelCNNStepper``) compute each layer at the new pixel only, from caches of the layers'
earlier outputs. A conditional network samples images of the given classes (``label``, (B,)), or
unconditionally with ``label=None``. Sampling draws each sub-pixel by inverting the CDF at a uniform
number fixed
in advance, so two steppers that compute the same logits give exactly the same images from the same
noise. Completion is generation with some sub-pixels given (``known`` / ``known_mask``).
"""

import math
from collections.abc import Callable

import torch
from torchvision.utils import make_grid

METHODS = ("cached", "naive")


def categorical_from_uniform(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sample (B,) levels from logits (B, K) at temperature T, using uniform numbers u (B,) in [0, 1).

    The level is the number of CDF values below u, computed in float64 from unnormalised
    probabilities (cumulative sums compared with u * total). Not ``torch.softmax``: on a (B, K) tensor
    it opens a parallel region on every call, which costs milliseconds when the CPU is busy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = logits.double()
    if temperature != 1.0:
        z = z / temperature
    cdf = (z - z.amax(-1, keepdim=True)).exp_().cumsum_(-1)
    return (cdf < u.double()[:, None] * cdf[:, -1:]).sum(-1).clamp_(max=logits.shape[-1] - 1)


class NaiveStepper:
    """The reference: a full network pass per sub-pixel."""

    def __init__(self, net: torch.nn.Module, label: torch.Tensor | None = None, condition=None):
        self.net = net
        self.label = label
        self.condition = condition

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        if self.condition is None:
            return self.net(x, self.label)[:, :, i, j]
        return self.net(x, self.label, self.condition)[:, :, i, j]


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose cached or naive")


def make_stepper(net: torch.nn.Module, method: str, label: torch.Tensor | None = None, condition=None):
    """``method``: cached (the network's ``cached_stepper(label)``) or naive (the reference).
    ``condition``: per-layer condition maps (the Multi-Scale PixelRNN's conditional network), or None."""
    check_method(method)
    if method == "naive":
        return NaiveStepper(net, label, condition)
    if not callable(getattr(net, "cached_stepper", None)):
        raise ValueError(f"{type(net).__name__} has no cached sampler; use method=naive")
    return net.cached_stepper(label) if condition is None else net.cached_stepper(label, condition)


def step_logits(net: torch.nn.Module, stepper, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
    """Logits (B, K) of sub-pixel (c, i, j) given the image ``x`` generated so far."""
    return net.distribution.logits_at(stepper.params(x, i, j, c), x[:, :, i, j], c)


def uniform_noise(num: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The uniform numbers (num, C, H, W) that fix ``num`` samples, from their own generator (the global
    random state is left alone, so sampling during training does not change the training run)."""
    return torch.rand(num, channels, height, width, generator=torch.Generator().manual_seed(seed))


def levels_grid(levels: torch.Tensor, num_levels: int, nrow: int | None = None) -> torch.Tensor:
    """Integer images (N, C, H, W) -> one float grid image (3, H', W') in [0, 1], ``nrow`` per row."""
    nrow = nrow or math.ceil(math.sqrt(len(levels)))
    return make_grid(levels.float().cpu() / (num_levels - 1), nrow=nrow, padding=2, pad_value=1.0)


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
    label: torch.Tensor | None = None,
    condition: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Generate images of integer levels (B, C, H, W).

    ``noise``: uniform numbers (B, C, H, W), one per sub-pixel, which fix the samples. ``known`` and
    ``known_mask`` (bool, same shape): sub-pixels taken as given instead of sampled (completion); the
    stepper still sees every step, since cached steppers fill their caches at known pixels too.
    ``method``: cached or naive (see ``make_stepper``). ``on_row(i)`` is called after each
    finished row (progress bars). ``label``: (B,) classes for a conditional network (None: unconditional).
    The network should be in eval mode.
    """
    own_order = getattr(net, "generate_levels", None)
    if callable(own_order):
        return own_order(noise, num_levels, temperature, method, known, known_mask, on_row, label)
    batch, channels, height, width = noise.shape
    if (known is None) != (known_mask is None):
        raise ValueError("completion needs both known and known_mask")
    if known is not None and (known.shape != noise.shape or known_mask.shape != noise.shape):
        raise ValueError(
            f"known {tuple(known.shape)} and known_mask {tuple(known_mask.shape)} must have the "
            f"noise's shape {tuple(noise.shape)}"
        )
    if label is not None:
        label = label.to(noise.device).long()
    stepper = make_stepper(net, method, label, condition)
    levels = torch.zeros(noise.shape, dtype=torch.long, device=noise.device)
    x = torch.zeros(noise.shape, dtype=next(net.parameters()).dtype, device=noise.device)
    if known is not None:
        known = known.to(noise.device).long()
        known_mask = known_mask.to(noise.device).bool()
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                logits = step_logits(net, stepper, x, i, j, c)
                new = categorical_from_uniform(logits, noise[:, c, i, j], temperature)
                if known is not None:
                    new = torch.where(known_mask[:, c, i, j], known[:, c, i, j], new)
                levels[:, c, i, j] = new
                x[:, c, i, j] = new.to(x.dtype) / (num_levels - 1)
        if on_row is not None:
            on_row(i)
    return levels


def class_rows(num_classes: int, num_samples: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class of at least ``num_samples`` images in all: (N,) classes,
    row by row, and the images per row, ceil(num_samples / num_classes)."""
    if num_classes < 1:
        raise ValueError("a grid of one row per class needs a conditional model")
    per_class = max(1, -(-num_samples // num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


def sample_grid(
    net: torch.nn.Module,
    num_samples: int,
    num_channels: int,
    image_size: int,
    num_levels: int,
    seed: int,
    temperature: float = 1.0,
    method: str = "cached",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``num_samples`` images sampled from noise fixed by ``seed``, with the network in eval mode (its mode
    is restored after). A conditional network (``net.num_classes`` > 0) gets one grid row per class
    (``class_rows``: at least ``num_samples`` images in all), every row from the same noise, so the
    images of a column differ only by their class. Returns the levels (N, C, H, W), their labels (N,)
    (None for an unconditional network) and the grid (3, H', W'). train.py's final samples and the
    sample-grid callback sample through here."""
    num_classes = getattr(net, "num_classes", 0)
    if num_classes > 0:
        labels, per_row = class_rows(num_classes, num_samples)
        noise = uniform_noise(per_row, num_channels, image_size, image_size, seed)
        noise = noise.repeat(num_classes, 1, 1, 1)
    else:
        labels, per_row = None, None
        noise = uniform_noise(num_samples, num_channels, image_size, image_size, seed)
    label = None if labels is None else labels.to(device)
    was_training = net.training
    net.eval()
    try:
        levels = generate(net, noise.to(device), num_levels, temperature, method, label=label)
    finally:
        net.train(was_training)
    return levels, labels, levels_grid(levels, num_levels, nrow=per_row)
