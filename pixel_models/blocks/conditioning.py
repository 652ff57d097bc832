"""Class conditioning as in van den Oord et al., *Conditional Image Generation with PixelCNN Decoders*
(NeurIPS 2016): a learned bias per class added to a layer's pre-activations (for LSTMs, to the gates).

Class ``num_classes`` is "no label": ``label=None`` means unconditional, and label dropout in training
(``AutoregressiveModule(label_dropout=p)``) teaches the same network to sample both ways. A bias is the
same at every position, so it cannot break the image's causal order, and it may influence every sub-pixel.
"""

import torch
from torch import nn


def class_index(label: torch.Tensor | None, batch: int, num_classes: int, device) -> torch.Tensor | None:
    """The class of each image (B,) for a network of ``num_classes`` classes (None when unconditional);
    ``label=None`` gives every image the "no label" class ``num_classes``."""
    if num_classes == 0:
        if label is not None:
            raise ValueError("this model is unconditional (model.conditional=false): it takes no label")
        return None
    if label is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if label.dim() != 1 or len(label) != batch or label.dtype != torch.long:
        raise ValueError(
            f"label must be a (B,) = ({batch},) LongTensor, got {tuple(label.shape)} {label.dtype}"
        )
    if len(label) and (int(label.min()) < 0 or int(label.max()) > num_classes):
        raise ValueError(
            f"labels must be classes 0..{num_classes - 1} (or {num_classes}: no label), "
            f"got {int(label.min())}..{int(label.max())}"
        )
    return label.to(device)


class ClassBias(nn.Module):
    """A learned bias (num_classes + 1, features): row ``num_classes`` is the "no label" class."""

    def __init__(self, num_classes: int, features: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, features)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> (B, features)."""
        return self.table(index)


def class_bias(num_classes: int, features: int) -> ClassBias | None:
    """A ``ClassBias`` for a conditional network, None for an unconditional one."""
    return ClassBias(num_classes, features) if num_classes > 0 else None
