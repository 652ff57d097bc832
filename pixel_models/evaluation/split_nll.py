"""Per-image and per-sub-pixel NLL of a model over a whole split, exact and counted once per image.

The per-sub-pixel NLL is the module's output distribution's (``distribution.nll_per_subpixel``), the
same arithmetic as the training loss; a module without one is read through the contract every module
keeps, ``forward`` -> logits over the K levels (B, K, C, H, W): ``log_softmax`` over K, gathered at the
true level. A conditional model is evaluated given each image's label: -log p(x | label).
"""

import math
from dataclasses import dataclass

import torch

from pixel_models.training.likelihood import per_class_mean


def subpixel_nll(module, levels: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """-log p in nats of every sub-pixel: integer levels (B, C, H, W) -> float32 (B, C, H, W)."""
    x = module.to_input(levels)
    distribution = getattr(module, "distribution", None)
    if hasattr(distribution, "nll_per_subpixel"):
        return distribution.nll_per_subpixel(module.net(x, label), levels).float()
    logits = module(x, label) if label is not None else module(x)
    log_probs = torch.log_softmax(logits.float(), dim=1)
    return -log_probs.gather(1, levels.long().unsqueeze(1)).squeeze(1)


@dataclass
class SplitEvaluation:
    """Everything measured over one split. ``nll[i]``: nats of image i (its index in the split);
    ``bits_map``: mean bits of each sub-pixel position (C, H, W); ``labels[i]``: its class, or -1."""

    nll: torch.Tensor  # float64 (N,)
    bits_map: torch.Tensor  # float64 (C, H, W)
    labels: torch.Tensor  # int64 (N,)

    @property
    def num_images(self) -> int:
        return len(self.nll)

    @property
    def dims(self) -> int:
        return self.bits_map.numel()

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def bpd(self) -> float:
        return self.mean_nll / (self.dims * math.log(2))

    def per_class(self) -> dict[int, dict[str, float]]:
        """Per label: the mean NLL (nats/image), bits/dim and number of images; empty without labels."""
        return {
            label: {"nll": mean, "bpd": mean / (self.dims * math.log(2)), "num_images": count}
            for label, (mean, count) in per_class_mean(self.nll, self.labels).items()
        }

    def extremes(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices of the ``count`` highest-NLL images (highest first) and lowest (lowest first)."""
        order = torch.argsort(self.nll, stable=True)
        count = min(count, len(order))
        return order.flip(0)[:count], order[:count]


@torch.no_grad()
def evaluate_split(module, loader, num_images: int, device: torch.device, on_batch=None) -> SplitEvaluation:
    """Runs ``module`` (in eval mode) over every batch of ``loader``: dicts with ``levels``, ``index`` and
    an optional ``label``. Every index in 0..num_images-1 must come exactly once."""
    nll = torch.zeros(num_images, dtype=torch.float64)
    seen = torch.zeros(num_images, dtype=torch.int64)
    labels = torch.full((num_images,), -1, dtype=torch.int64)
    bits_sum = None
    module.eval()
    for batch in loader:
        levels, index = batch["levels"].to(device), torch.as_tensor(batch["index"]).long()
        label = module.batch_label(batch) if hasattr(module, "batch_label") else None
        label = torch.as_tensor(label).to(device) if label is not None else None
        per_subpixel = subpixel_nll(module, levels, label).double().cpu()
        nll[index] = per_subpixel.flatten(1).sum(1)
        seen.index_add_(0, index, torch.ones_like(index))
        if batch.get("label") is not None:
            labels[index] = torch.as_tensor(batch["label"]).long()
        total = per_subpixel.sum(0)
        bits_sum = total if bits_sum is None else bits_sum + total
        if on_batch is not None:
            on_batch(len(index))
    if bits_sum is None or not bool((seen == 1).all()):
        raise RuntimeError(
            f"the data loader gave {int((seen > 0).sum())} of {num_images} images "
            f"({int((seen > 1).sum())} more than once): every image must come exactly once"
        )
    return SplitEvaluation(nll=nll, bits_map=bits_sum / num_images / math.log(2), labels=labels)
