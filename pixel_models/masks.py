"""Masks that make convolutions autoregressive over pixels and colour channels.

After van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.4: every feature map of
every layer belongs to one colour group (R, G or B for C=3). Spatially a masked kernel sees the rows
above and the pixels to the left of its centre; at the centre pixel a group sees the earlier groups
(mask A, used once on the image) and, with mask B, also its own group.

Groups are interleaved: feature ``f`` of a layer belongs to group ``f % C``, so any width works (the
paper's h=128 with C=3 gives groups of 43, 43 and 42) and logits viewed as (K, C) put level ``k`` of
colour ``c`` at feature ``k * C + c``. A layer whose output is cut into equal chunks (the LSTM gates
i, f, o, g) numbers each chunk on its own, so every gate's groups line up with the hidden state's.
This function is the single place the assignment is made.
"""

import torch
import torch.nn.functional as F
from torch import nn


def channel_groups(num_features: int, num_colors: int, num_chunks: int = 1) -> torch.Tensor:
    """Colour group of each of ``num_features`` maps: ``f % C`` within each of ``num_chunks`` chunks."""
    if num_features % num_chunks != 0:
        raise ValueError(f"{num_features} feature maps cannot be cut into {num_chunks} equal chunks")
    chunk = num_features // num_chunks
    if chunk < num_colors:
        raise ValueError(
            f"{chunk} feature maps cannot hold {num_colors} colour groups; use at least {num_colors}"
        )
    return (torch.arange(chunk) % num_colors).repeat(num_chunks)


def causal_mask(
    out_features: int,
    in_features: int,
    kernel_size: tuple[int, int],
    num_colors: int,
    mask_type: str,
    out_chunks: int = 1,
) -> torch.Tensor:
    """A 0/1 mask of shape (out, in, kh, kw) for a kernel centred at (kh // 2, kw // 2).

    ``out_chunks`` > 1 numbers the groups of each equal chunk of the outputs separately (gates).
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = kernel_size
    ci, cj = kh // 2, kw // 2
    mask = torch.zeros(out_features, in_features, kh, kw)
    mask[:, :, :ci, :] = 1  # rows above
    mask[:, :, ci, :cj] = 1  # left of the centre on its row
    out_group = channel_groups(out_features, num_colors, out_chunks)[:, None]
    in_group = channel_groups(in_features, num_colors)[None, :]
    sees_centre = out_group > in_group if mask_type == "A" else out_group >= in_group
    mask[:, :, ci, cj] = sees_centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution whose kernel is multiplied by a causal mask (A or B).

    ``kernel_size`` may be rectangular: (1, k) is the Row LSTM's k x 1 input-to-state convolution
    along a row. Odd sizes only, so the centre is a pixel. ``out_chunks``: see ``causal_mask``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str,
        num_colors: int,
        bias: bool = True,
        out_chunks: int = 1,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"masked kernels must have odd sizes, got {kh}x{kw}")
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=bias)
        self.mask_type = mask_type
        self.num_colors = num_colors
        self.register_buffer(
            "mask", causal_mask(out_channels, in_channels, (kh, kw), num_colors, mask_type, out_chunks),
            persistent=False,
        )

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask_type={self.mask_type}, num_colors={self.num_colors}"
