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
    out_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 0/1 mask of shape (out, in, kh, kw) for a kernel centred at (kh // 2, kw // 2).

    ``out_chunks`` > 1 numbers the groups of each equal chunk of the outputs separately (gates);
    ``out_groups`` gives each output's group explicitly instead (an output distribution's parameters, see
    ``distributions``).
    """
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = kernel_size
    ci, cj = kh // 2, kw // 2
    mask = torch.zeros(out_features, in_features, kh, kw)
    mask[:, :, :ci, :] = 1  # rows above
    mask[:, :, ci, :cj] = 1  # left of the centre on its row
    if out_groups is None:
        out_groups = channel_groups(out_features, num_colors, out_chunks)
    elif out_groups.shape != (out_features,) or (
        # (on the meta device, where checkpoint.py sizes a network before building it, values are unknown)
        not out_groups.is_meta and not bool(((out_groups >= 0) & (out_groups < num_colors)).all())
    ):
        raise ValueError(
            f"out_groups must give each of {out_features} outputs a group in 0..{num_colors - 1}"
        )
    out_group = out_groups[:, None]
    in_group = channel_groups(in_features, num_colors)[None, :]
    sees_centre = out_group > in_group if mask_type == "A" else out_group >= in_group
    mask[:, :, ci, cj] = sees_centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A 'same'-padded convolution whose kernel is multiplied by a causal mask (A or B).

    ``kernel_size`` may be rectangular: (1, k) is the Row LSTM's k x 1 input-to-state convolution
    along a row. Odd sizes only, so the centre is a pixel. ``out_chunks``, ``out_groups``: see
    ``causal_mask``.
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
        out_groups: torch.Tensor | None = None,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"masked kernels must have odd sizes, got {kh}x{kw}")
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2), bias=bias)
        self.mask_type = mask_type
        self.num_colors = num_colors
        self.register_buffer(
            "mask",
            causal_mask(out_channels, in_channels, (kh, kw), num_colors, mask_type, out_chunks, out_groups),
            persistent=False,
        )

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def kept_rows_weight(self) -> torch.Tensor:
        """The masked kernel's rows 0 .. kh // 2: every row below the centre is zero."""
        rows = self.kernel_size[0] // 2 + 1
        return self.weight[:, :, :rows] * self.mask[:, :, :rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if kh == kw == 1:
            # A 1x1 convolution is a matrix product per image; one batched product beats the
            # convolution kernels at these widths (about 1.5x on one CPU thread at 16-128 maps).
            b, c, height, width = x.shape
            weight = self.masked_weight().view(self.out_channels, c).expand(b, -1, -1)
            flat = x.reshape(b, c, height * width)
            out = (
                torch.bmm(weight, flat)
                if self.bias is None
                else torch.baddbmm(self.bias[:, None], weight, flat)
            )
            return out.view(b, self.out_channels, height, width)
        # The mask zeroes every row below the centre: convolve with the rows 0 .. kh // 2 only (a 7x7
        # kernel needs 4 rows, 3x3 needs 2). With the usual padding the output has kh // 2 extra rows at
        # the bottom, dropped; padding inside the convolution keeps autograd from saving a padded copy.
        return F.conv2d(x, self.kept_rows_weight(), self.bias, padding=self.padding)[:, :, : x.shape[2]]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mask_type={self.mask_type}, num_colors={self.num_colors}"

    def at_position(self) -> "ConvAtPosition":
        """This convolution evaluated at one pixel at a time (cached sampling); see ``ConvAtPosition``."""
        return ConvAtPosition(self)


class ConvAtPosition:
    """A ``MaskedConv2d`` evaluated at one pixel (i, j) only: the building block of cached samplers.

    A masked kernel centred on row i reads rows i - kh//2 .. i of its input and nothing below, so only
    its top kh//2 + 1 rows are kept, flattened once into a matrix (rows * kw * F_in, F_out). The taps
    right of the centre on row i stay in the matrix (their weights are masked to zero), which lets a
    single slice of the input gather every tap. Per call: that slice, one reshape, one addmm.

    The input is read from a *cache*: the layer's input map, zero padded and channels last,
    (B, H + kh//2, W + 2 * (kw//2), F_in), so image pixel (i, j) sits at (i + kh//2, j + kw//2), the
    padding needs no bounds checks, and gathering a window copies runs of F_in contiguous values
    (about twice as fast as from a (B, F, H, W) map at these sizes). No padding below: nothing below row
    i is read. A 1x1 convolution needs no cache: call the object on the (B, F_in) input at the pixel.

    The weights are copied when this object is made; make a new one after they change.
    """

    def __init__(self, conv: MaskedConv2d):
        kh, kw = conv.kernel_size
        self.pad_top, self.pad_side = kh // 2, kw // 2
        self.rows, self.cols = self.pad_top + 1, kw
        self.in_features = conv.in_channels
        weight = conv.masked_weight().detach()[:, :, : self.rows]  # (F_out, F_in, rows, kw)
        # Ordered (rows, kw, F_in) like a gathered window; transposed for taps @ matrix.
        self.matrix = weight.permute(0, 2, 3, 1).reshape(len(weight), -1).t()
        self.bias = conv.bias.detach().clone() if conv.bias is not None else weight.new_zeros(len(weight))

    def __call__(self, taps: torch.Tensor) -> torch.Tensor:
        """(B, rows * kw * F_in) gathered input -> (B, F_out) output at the pixel."""
        return torch.addmm(self.bias, taps, self.matrix)

    def new_cache(self, batch: int, height: int, width: int) -> torch.Tensor:
        """A zero input cache for an H x W image (zeros are also the convolution's padding)."""
        size = (batch, height + self.pad_top, width + 2 * self.pad_side, self.in_features)
        return self.bias.new_zeros(size)

    def write(self, cache: torch.Tensor, i: int, j: int, values: torch.Tensor) -> None:
        """Store the layer's input (B, F_in) at pixel (i, j)."""
        cache[:, i + self.pad_top, j + self.pad_side] = values

    def write_rows(self, cache: torch.Tensor, first: int, rows: torch.Tensor) -> None:
        """Store whole rows (B, F_in, n, W) of the layer's input, starting at image row ``first``."""
        top = first + self.pad_top
        left = self.pad_side
        cache[:, top : top + rows.shape[2], left : left + rows.shape[3]] = rows.permute(0, 2, 3, 1)

    def at(self, cache: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The output (B, F_out) at pixel (i, j), reading the cache's rows i - kh//2 .. i."""
        taps = cache[:, i : i + self.rows, j : j + self.cols]  # padded coordinates: the window's top left
        return self(taps.reshape(len(cache), -1))
