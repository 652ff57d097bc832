"""Gated PixelCNN, as in van den Oord et al., *Conditional Image Generation with PixelCNN Decoders*
(NeurIPS 2016), section 2 and Figure 2.

Two stacks of feature maps, p = ``hidden`` each, run side by side through ``num_layers`` gated layers:

- the **vertical stack** sees everything above: a (k//2 + 1) x k convolution over the k//2 rows above
  and the current row (no mask: the stack only reaches the horizontal one after a one-row down shift,
  so whatever it sees on its own row is strictly above the pixel it informs);
- the **horizontal stack** sees the row to the left: a 1 x (k//2 + 1) convolution over the k//2 pixels
  to the left and the pixel itself, masked at the pixel by colour groups (``blocks.masks``: mask A in
  the first layer, which reads the image, mask B after), so R -> G -> B within a pixel holds for C=3.

Per layer, with p-map stacks v (vertical) and h (horizontal) and ``*`` a convolution:

    v_pre = W_v * v (+ class bias)                     2p maps
    h_pre = W_h * h + W_vh * shift_down(v_pre) (+ class bias)
    v' = tanh(v_pre[:p]) . sigmoid(v_pre[p:])          the gated activation of the paper
    out = W_o * (tanh(h_pre[:p]) . sigmoid(h_pre[p:]))  W_o, W_vh: 1x1 (W_o mask B)
    h' = h + out  (residual; not in the first layer, whose input is the image)

The gate maps of h_pre are numbered in two chunks (``out_chunks=2``), so gate map q + p carries the same
colour group as tanh map q, which it multiplies. The shifted vertical term comes from rows above only,
so it may enter every colour group. Every layer's ``out`` is summed (skip connections) into ReLU + 1x1
mask-B output layers giving the output distribution's parameters (B, P, H, W).

Receptive field, no blind spot: with A = sum over layers of k//2 (the first layer's 7x7 gives 3), the
output at (i, j) sees exactly the rows i - A - 1 .. i - 1 at columns j - A .. j + A, and row i at
columns j - A .. j - 1 (and the pixel's earlier colours); tested exactly by gradients.

Conditional (``num_classes`` > 0): a learned per-class bias on both stacks' gate pre-activations in
every layer (``blocks.conditioning``), the paper's class-conditional model with a one-hot h.

``GatedPixelCNN.cached_stepper()`` samples without re-running the network: ``CachedGatedPixelCNNStepper``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pixel_models.blocks.conditioning import class_bias, class_index
from pixel_models.blocks.layers import FirstLayerAtPosition, OutputLayers, check_input
from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.distributions import build_distribution


def gate(pre: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """tanh(first half) . sigmoid(second half) along ``dim``: 2p maps -> p maps."""
    f, g = pre.chunk(2, dim)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One gated layer of both stacks: (v, h) -> (v', h', out), ``out`` the layer's skip contribution."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_colors: int,
        kernel_size: int,
        mask_type: str,
        residual: bool = True,
        num_classes: int = 0,
    ):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel sizes must be odd, got {kernel_size}")
        self.hidden = hidden
        self.pad = kernel_size // 2
        self.vertical = nn.Conv2d(in_features, 2 * hidden, (self.pad + 1, kernel_size))
        # A 1 x k masked kernel: the taps right of the centre are masked to zero and skipped in forward;
        # kept in the weight so that the cached sampler's ConvAtPosition reads it as it is.
        self.horizontal = MaskedConv2d(
            in_features, 2 * hidden, (1, kernel_size), mask_type, num_colors, out_chunks=2
        )
        self.vertical_to_horizontal = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.output = MaskedConv2d(hidden, hidden, 1, "B", num_colors)
        self.residual = residual and in_features == hidden
        self.vertical_bias = class_bias(num_classes, 2 * hidden)
        self.horizontal_bias = class_bias(num_classes, 2 * hidden)

    def forward(self, v: torch.Tensor, h: torch.Tensor, index: torch.Tensor | None = None):
        pad = self.pad
        v_pre = self.vertical(F.pad(v, (pad, pad, pad, 0)))  # rows i - k//2 .. i, columns j +- k//2
        weight = self.horizontal.masked_weight()[..., : pad + 1]  # columns j - k//2 .. j
        h_pre = F.conv2d(F.pad(h, (pad, 0)), weight, self.horizontal.bias)
        if self.vertical_bias is not None:
            v_pre = v_pre + self.vertical_bias(index)[:, :, None, None]
            h_pre = h_pre + self.horizontal_bias(index)[:, :, None, None]
        shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # row i gets the vertical stack of row i - 1
        h_pre = h_pre + self.vertical_to_horizontal(shifted)
        out = self.output(gate(h_pre))
        return gate(v_pre), (h + out if self.residual else out), out


class GatedPixelCNN(nn.Module):
    """``num_layers`` gated layers (the first with ``first_kernel_size`` and mask A), then output layers."""

    def __init__(
        self,
        num_channels: int,
        num_levels: int,
        hidden: int = 16,
        num_layers: int = 7,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        output_hidden: int = 32,
        num_output_layers: int = 2,
        residual: bool = True,
        skip: bool = True,
        output: dict | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.skip = skip
        self.distribution = build_distribution(output, num_channels, num_levels)
        self.layers = nn.ModuleList(
            [GatedLayer(num_channels, hidden, num_channels, first_kernel_size, "A", False, num_classes)]
            + [
                GatedLayer(hidden, hidden, num_channels, kernel_size, "B", residual, num_classes)
                for _ in range(num_layers - 1)
            ]
        )
        self.output = OutputLayers(hidden, output_hidden, num_channels, self.distribution, num_output_layers)

    def reach(self) -> int:
        """A: how many columns to each side (and rows above, plus one) the output at a pixel sees."""
        return sum(layer.pad for layer in self.layers)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> the distribution's parameters (B, P, H, W)."""
        check_input(x, self.num_channels)
        index = class_index(label, len(x), self.num_classes, x.device)
        v, h, skip_sum = x, x, None
        for layer in self.layers:
            v, h, out = layer(v, h, index)
            skip_sum = out if skip_sum is None else skip_sum + out
        return self.output(skip_sum if self.skip else h)

    def cached_stepper(self, label: torch.Tensor | None = None) -> "CachedGatedPixelCNNStepper":
        return CachedGatedPixelCNNStepper(self, label)


class GatedLayerAtPosition:
    """A gated layer for cached sampling: its vertical stack a row at a time, its horizontal one a pixel
    at a time (see the stepper below).

    Buffers: ``rows``, the vertical stack's input over the k//2 + 1 rows its kernel reads (channels first,
    zero padded at the sides; zeros at first are the rows above the image); ``above``, the horizontal
    stack's term from the vertical one, W_vh * v_pre of the row above, for the whole current row (B, W, 2p);
    ``row``, the horizontal stack's input along the current row (a ``ConvAtPosition`` cache one row high).
    The first layer reads the image instead of a ``row`` (``FirstLayerAtPosition``).
    """

    def __init__(self, layer: GatedLayer, first: bool):
        self.hidden, self.pad, self.residual = layer.hidden, layer.pad, layer.residual
        self.vertical_weight = layer.vertical.weight.detach().clone()
        self.vertical_bias = layer.vertical.bias.detach().clone()
        self.to_horizontal = layer.vertical_to_horizontal.weight.detach()[:, :, 0, 0].t().clone()
        self.to_horizontal_bias = layer.vertical_to_horizontal.bias.detach().clone()
        conv = layer.horizontal
        self.horizontal = FirstLayerAtPosition(conv) if first else conv.at_position()
        self.first = first
        self.output = layer.output.at_position()
        self.class_tables = (layer.vertical_bias, layer.horizontal_bias)

    def reset(self, batch: int, width: int, index: torch.Tensor | None) -> None:
        like, pad = self.vertical_bias, self.pad
        in_features = self.vertical_weight.shape[1]
        self.rows = like.new_zeros(batch, in_features, pad + 1, width + 2 * pad)
        if index is None:
            self.class_v = self.class_h = None
        else:
            self.class_v, self.class_h = (table(index).detach() for table in self.class_tables)
        if not self.first:
            self.row = self.horizontal.new_cache(batch, 1, width)
        # Row 0: nothing above, the shifted vertical term is W_vh * 0 + its bias.
        self.above = self.to_horizontal_bias.expand(batch, width, -1).clone()
        self.above_at = self.above.unbind(1)

    def push_row(self, values: torch.Tensor) -> None:
        """Append a finished row (B, F_in, W) of the vertical stack's input; the oldest row drops out."""
        self.rows[:, :, :-1] = self.rows[:, :, 1:].clone()
        self.rows[:, :, -1, self.pad : self.pad + values.shape[-1]] = values

    def vertical_row(self) -> torch.Tensor:
        """The vertical stack on the newest row pushed: sets ``above`` for the next image row from its
        pre-activations and returns the stack's output there (B, p, W), the next layer's input."""
        v_pre = F.conv2d(self.rows, self.vertical_weight, self.vertical_bias)[:, :, 0]  # (B, 2p, W)
        if self.class_v is not None:
            v_pre = v_pre + self.class_v[:, :, None]
        pre_last = v_pre.transpose(1, 2)  # (B, W, 2p)
        torch.addmm(
            self.to_horizontal_bias,
            pre_last.reshape(-1, pre_last.shape[-1]),
            self.to_horizontal,
            out=self.above.view(-1, self.above.shape[-1]),
        )
        return gate(v_pre)

    def __call__(self, h: torch.Tensor, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The layer's ``out`` (B, p) at pixel (i, j), from the horizontal input h (B, F_in) there (the
        first layer reads the image ``x`` instead)."""
        if self.first:
            h_pre = self.horizontal.features(x, i, j)
        else:
            self.horizontal.write(self.row, 0, j, h)
            h_pre = self.horizontal.at(self.row, 0, j)
        h_pre = h_pre + self.above_at[j]
        if self.class_h is not None:
            h_pre = h_pre + self.class_h
        return self.output(gate(h_pre))


class CachedGatedPixelCNNStepper:
    """Output parameters at one pixel at a time, computing the vertical stack once per row.

    The horizontal stack at row i reads the vertical stack of row i - 1 only, and that depends on image
    rows < i, all final when row i starts. So when row i starts (i >= 1), image row i - 1 is pushed into
    the first layer's row buffer and, layer by layer, the vertical stack is computed for the whole of row
    i - 1 (one convolution over the buffered k//2 + 1 rows), its 1x1 term for the horizontal stack kept
    for row i, and its output pushed into the next layer's buffer: a whole-row pass per layer per row.

    One step computes, at pixel (i, j) only, per layer: the 1 x k horizontal convolution from the cached
    row (columns j - k//2 .. j, the one at j just written; the first layer reads the image), plus the
    cached vertical term, the gate, the 1x1 output, the residual and the skip sum; then the output layers.

    Colours: the steps for R, G and B of a pixel each recompute it and overwrite its cache entries. The
    horizontal stack's maps of colour group g at (i, j) depend at (i, j) only on the colours before g
    (mask A, then mask B, gates grouped like the maps they multiply) and the vertical term is from rows
    above, so the logits of colour g are right, and after the last colour's step the cached values at
    (i, j) are those of the finished image.

    Calls must come in raster order (R, G, B of each pixel, pixels row by row), as ``generate`` makes
    them; the caches start over at (0, 0, colour 0). The weights are copied when the stepper is made.
    """

    def __init__(self, net: GatedPixelCNN, label: torch.Tensor | None = None):
        self.num_classes = net.num_classes
        self.label = label
        self.skip = net.skip
        self.layers = [GatedLayerAtPosition(layer, first=n == 0) for n, layer in enumerate(net.layers)]
        self.output = net.output.at_position()

    def start_row(self, x: torch.Tensor, i: int) -> None:
        if i == 0:
            return  # ``reset`` left every layer's vertical term at its row-0 value
        values = x[:, :, i - 1]
        for layer in self.layers:
            layer.push_row(values)
            values = layer.vertical_row()

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        """The distribution's parameters (B, P) at pixel (i, j) for colour c's step, given the image ``x``
        (B, C, H, W) generated so far."""
        if (i, j, c) == (0, 0, 0):
            batch, _, _, width = x.shape
            index = class_index(self.label, batch, self.num_classes, x.device)
            for layer in self.layers:
                layer.reset(batch, width, index)
        if (j, c) == (0, 0):
            self.start_row(x, i)
        h, skip_sum = None, None
        for layer in self.layers:
            out = layer(h, x, i, j)
            h = h + out if layer.residual else out
            skip_sum = out if skip_sum is None else skip_sum + out
        return self.output(skip_sum if self.skip else h)
