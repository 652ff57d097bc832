"""Exact likelihood bookkeeping: nats per image, bits per sub-pixel, and split-level sums.

A split's NLL is the sum over its images divided by their number: never a mean of batch means, which
over-weights an uneven last batch.
"""

import math

import torch
import torch.nn.functional as F


def nll_per_image(logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """-log p(x) in nats for each image. logits (B, K, C, H, W), levels (B, C, H, W) ints -> (B,)."""
    if logits.shape[0] != levels.shape[0] or logits.shape[2:] != levels.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match images {tuple(levels.shape)}")
    nll = F.cross_entropy(logits.float(), levels.long(), reduction="none")
    return nll.flatten(1).sum(1)


def bits_per_dim(nats_per_image: torch.Tensor | float, dims_per_image: int) -> torch.Tensor | float:
    """Nats per image -> bits per sub-pixel (dims = C * H * W)."""
    return nats_per_image / (dims_per_image * math.log(2))


def per_class_mean(nll: torch.Tensor, labels: torch.Tensor) -> dict[int, tuple[float, int]]:
    """Per class: (the mean of its images' NLL, their number), from per-image NLL (N,) and labels (N,)
    (images labelled -1 are left out). Training's ``SplitNLL`` and ``evaluate.py`` both report this."""
    result = {}
    for label in torch.unique(labels[labels >= 0]).tolist():
        of_class = nll[labels == label].double()
        result[int(label)] = (float(of_class.sum() / len(of_class)), len(of_class))
    return result


class SplitNLL:
    """Accumulates per-image NLL by dataset index so that a split's mean counts each image exactly once.

    Indexing by image makes the total independent of batching, and of a distributed sampler that pads a
    rank with repeated images: a repeated image adds to ``count`` and is averaged back to one value.

    With labels (``update(..., labels)``), ``per_class_mean`` gives the same exact mean over the images of
    each class. Labels are summed like the NLL, as label + 1 per visit (0: never labelled), so that they
    reduce over processes with the same sum and a repeated image still gives back its own label.
    """

    def __init__(self, num_images: int, device: torch.device | str = "cpu"):
        self.total = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_images, dtype=torch.float64, device=device)
        self.label_total = torch.zeros(num_images, dtype=torch.float64, device=device)

    def update(self, nll: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        indices = indices.to(self.total.device)
        self.total.index_add_(0, indices, nll.detach().to(self.total))
        self.count.index_add_(0, indices, torch.ones_like(self.count[: len(indices)]))
        if labels is not None:
            self.label_total.index_add_(0, indices, labels.detach().to(self.label_total) + 1)

    def all_reduce(self, reduce_fn) -> None:
        """Sum the buffers over processes with ``reduce_fn`` (e.g. Lightning's ``all_reduce(x, "sum")``)."""
        self.total = reduce_fn(self.total)
        self.count = reduce_fn(self.count)
        self.label_total = reduce_fn(self.label_total)

    def per_class_mean(self) -> dict[int, tuple[float, int]]:
        """Per class seen: (mean NLL over its images, number of images); empty without labels."""
        seen = (self.count > 0) & (self.label_total > 0)
        labels = (self.label_total[seen] / self.count[seen]).round().long() - 1
        return per_class_mean(self.total[seen] / self.count[seen], labels)

    @property
    def num_seen(self) -> int:
        return int((self.count > 0).sum())

    def mean(self) -> float:
        seen = self.count > 0
        if not seen.any():
            raise RuntimeError("no images were evaluated")
        return float((self.total[seen] / self.count[seen]).sum() / seen.sum())
