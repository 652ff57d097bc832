"""Diagonal BiLSTM, as in van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.2.

The map is skewed (row r shifted right by r) so that each diagonal of the image becomes a column; an
LSTM then runs over the columns, one diagonal per step. Per direction, with x the layer input:

    [i, f, o, g] = [sigmoid, sigmoid, sigmoid, tanh](K_is * x + K_ss * h_prev)
    c = f . c_prev + i . g,        h = o . tanh(c)

K_is is a 1x1 mask-B convolution; K_ss a 2x1 convolution over the previous column reading rows r-1
and r, i.e. the pixel above and the pixel to the left; c_prev is the left pixel's cell. So the
left-to-right direction sees the rectangle above and to the left of a pixel. The right-to-left
direction runs on the mirrored map and sees the rectangle above and to the right, which includes the
rest of the pixel's own row; its output is shifted down one row before being added, which leaves
the layer's own input at every earlier pixel (and, mask B, at the pixel itself) as its context. A 1x1
mask-B convolution takes the h hidden maps back to the stack's 2h maps.

The right-to-left direction also reads the image itself (an unmasked 1x1 convolution of the C
colours into its gates). The paper does not spell this input out, but without it the network misses
the end of the row above: pixel (i - 1, W - 1) is in no feature of rows <= i - 1 (features never see
their own pixel, and nothing lies to its right), and the 7x7 first layer brings it into row i only at
columns >= W - 4. Reading the image is causal because this direction's output moves down one row:
the state of row i - 1 may hold all of row i - 1. With it one layer covers every earlier pixel, the
complete context the paper claims for the Diagonal BiLSTM.

The network: 7x7 mask-A first layer, ``num_layers`` such layers with residual and skip connections,
ReLU + 1x1 mask-B output layers giving the output distribution's parameters (B, P, H, W) (``distributions``).
Runs at any H and W. Conditional (``num_classes`` > 0): a learned per-class bias on the first layer's output
and on both directions' gates in every layer (``blocks.conditioning``).

``DiagonalBiLSTM.cached_stepper()`` samples without re-running the whole network for every
sub-pixel: see ``CachedDiagonalBiLSTMStepper``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixel_models.blocks.conditioning import class_bias
from pixel_models.blocks.layers import (
    FirstLayer,
    OutputLayers,
    ResidualSkipStack,
    StackInputAtPosition,
    stack_at_position,
    stack_input,
)
from pixel_models.blocks.lstm import LSTMGatesAtPixel
from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.blocks.recurrence import diagonal_recurrence
from pixel_models.distributions import build_distribution


def skew(x: torch.Tensor) -> torch.Tensor:
    """(..., n, m) -> (..., n, n + m - 1): row r shifted right by r, zeros elsewhere.

    Padding every row with n zeros and re-reading the flat buffer with rows one shorter moves row r
    right by r in a single copy.
    """
    n, m = x.shape[-2:]
    width = n + m - 1
    flat = F.pad(x, (0, n)).flatten(-2)
    return flat[..., : n * width].unflatten(-1, (n, width))


def unskew(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``skew``: (..., n, n + m - 1) -> (..., n, m), element (r, j) read from (r, r + j)."""
    n, width = x.shape[-2:]
    m = width - n + 1
    if m < 1:
        raise ValueError(f"a skewed map of {n} rows needs at least {n} columns, got {width}")
    # Reading the flat buffer with rows one longer undoes the shift; the pad only makes the last row whole.
    flat = F.pad(x.flatten(-2), (0, n))
    return flat.unflatten(-1, (n, width + 1))[..., :m]


class DiagonalBiLSTMLayer(nn.Module):
    """One Diagonal BiLSTM layer: 2h maps in, two LSTMs of h hidden maps, 2h maps out (mask-B 1x1).

    The two directions advance together in every step: their gates are one tensor laid out
    (direction, gate, feature) and their state-to-state convolutions one grouped convolution.
    """

    def __init__(self, hidden: int, num_colors: int, num_classes: int = 0):
        super().__init__()
        self.hidden = hidden
        # Output chunks: [left-to-right i, f, o, g | right-to-left i, f, o, g]; numbering the groups of
        # each chunk separately lines every gate up with the hidden state it multiplies. A 1x1
        # convolution commutes with skewing and mirroring, so it runs once on the plain map.
        self.input_to_state = MaskedConv2d(2 * hidden, 8 * hidden, 1, "B", num_colors, out_chunks=8)
        # The 2x1 kernel reads rows r-1 (tap 0, the pixel above) and r (tap 1, the pixel to the left) of
        # the previous column. Both are earlier pixels in any colour group, so no mask; no bias since
        # input_to_state has one. groups=2 keeps the directions apart.
        self.state_to_state = nn.Conv1d(2 * hidden, 8 * hidden, 2, groups=2, bias=False)
        # Right-to-left gates only, from the image: see the module docstring. No mask, no bias.
        self.image_to_state = nn.Conv2d(num_colors, 4 * hidden, 1, bias=False)
        self.output = MaskedConv2d(hidden, 2 * hidden, 1, "B", num_colors)
        self.class_bias = class_bias(num_classes, 8 * hidden)  # both directions' gates

    # Set by the network's ``checkpoint_recurrence``: recompute this layer in the backward pass instead
    # of keeping its activations (gates, cell states: several times its input) from the forward pass.
    recompute_in_backward = False

    def forward(
        self, x: torch.Tensor, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.recompute_in_backward and torch.is_grad_enabled():
            return checkpoint(self.compute, x, image, label, use_reentrant=False)
        return self.compute(x, image, label)

    def compute(
        self, x: torch.Tensor, image: torch.Tensor, label: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's output (B, 2h, H, W): ``output(left_to_right + right_to_left moved one row down)``.

        ``x``: the layer input (B, 2h, H, W); ``image``: the network's input (B, C, H, W), read by the
        right-to-left direction only (see the module docstring); ``label``: class indices (B,) of a
        conditional network. The right-to-left state of row i-1 covers rows <= i-1 only, so after the
        move no pixel sees its own row to the right, nor itself.

        The input-to-state convolutions (1x1: they commute with skewing and mirroring), the class bias,
        both LSTMs (the right-to-left one is the left-to-right recurrence on the mirrored map), the move
        and the output convolution run as one autograd node (``blocks.recurrence.DiagonalRecurrence``),
        one diagonal per step. The state entering each row from the left is exactly zero.
        """
        h = self.hidden
        # (8h, h, 2) grouped weight -> per direction and tap (2, 4h, h): tap 0 the pixel above, 1 the left.
        taps = self.state_to_state.weight.view(2, 4 * h, h, 2)
        return diagonal_recurrence(
            x,
            image,
            self.input_to_state.masked_weight().flatten(1),
            self.input_to_state.bias,
            self.image_to_state.weight.flatten(1),
            None if self.class_bias is None else self.class_bias(label),
            taps[..., 0],
            taps[..., 1],
            self.output.masked_weight().flatten(1),
            self.output.bias,
        )


class DiagonalBiLSTM(nn.Module):
    """``num_layers`` Diagonal BiLSTM layers of h hidden maps between first and output layers."""

    def __init__(
        self,
        num_channels: int,
        num_levels: int,
        hidden: int = 16,
        num_layers: int = 7,
        output_hidden: int = 32,
        num_output_layers: int = 2,
        residual: bool = True,
        skip: bool = True,
        output: dict | None = None,
        num_classes: int = 0,
        checkpoint_recurrence: bool = False,
    ):
        super().__init__()
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.distribution = build_distribution(output, num_channels, num_levels)
        self.first = FirstLayer(num_channels, 2 * hidden)
        self.first_bias = class_bias(num_classes, 2 * hidden)
        self.stack = ResidualSkipStack(
            [DiagonalBiLSTMLayer(hidden, num_channels, num_classes) for _ in range(num_layers)],
            residual=residual,
            skip=skip,
        )
        self.output = OutputLayers(
            2 * hidden, output_hidden, num_channels, self.distribution, num_output_layers
        )
        for layer in self.stack.layers:
            layer.recompute_in_backward = checkpoint_recurrence

    def forward(
        self, x: torch.Tensor, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> the distribution's parameters (B, P, H, W). ``condition``: maps
        (B, 2h, H, W) added to the first layer's output and to each layer's input (Multi-Scale PixelRNN)."""
        h, index, condition = stack_input(self, x, label, condition)
        # The stack's maps batch innermost, the layout its layers compute in (``DiagonalRecurrence``): the
        # residual and skip additions then add like-laid-out maps, and no layer copies its input again.
        # The output layers get the usual layout back.
        h = h.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
        return self.output(self.stack(h, x, index, condition=condition).contiguous())

    def cached_stepper(
        self, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ) -> "CachedDiagonalBiLSTMStepper":
        return CachedDiagonalBiLSTMStepper(self, label, condition)


class DiagonalBiLSTMLayerAtPosition:
    """The left-to-right direction of a Diagonal BiLSTM layer at one pixel, and the layer's output there
    (cached sampling). The right-to-left direction runs a row at a time: see the stepper below.

    The left-to-right state at (i, j) continues from h(i - 1, j), the pixel above, and h(i, j - 1),
    c(i, j - 1), the pixel to the left. Row buffers (views into the stepper's, one per layer), channels
    last so that a pixel is a contiguous slice:

    - ``record`` (B, W + 1, 3h): column j holds [h_l2r(i, j - 1), x(i, j)], the state left of pixel j
      next to the layer's input at j, so that one matrix product takes both. Column 0 holds the zero
      state left of the image; the input part of column W is unused.
    - ``cell`` (B, W + 1, h): column j + 1 holds c_l2r(i, j); column 0 is zero.
    - ``gates_above`` (B, W, 4h): h_l2r(i - 1, j) through the state-to-state tap above, plus the
      input-to-state bias; ``output_above`` (B, W, 2h): h_r2l(i - 1, j) through the output convolution,
      plus its bias. Both made for the whole row when it starts, from the finished row above.
    """

    def __init__(self, layer: DiagonalBiLSTMLayer):
        self.hidden = h = layer.hidden
        input_matrix = layer.input_to_state.masked_weight().detach()[: 4 * h, :, 0, 0].t()  # (2h, 4h)
        left_tap = layer.state_to_state.weight.detach()[: 4 * h, :, 1].t()  # (h, 4h)
        self.matrix = torch.cat([left_tap, input_matrix])  # (3h, 4h), rows ordered like a record
        self.output_matrix = layer.output.at_position().matrix  # (h, 2h)

    def bind(
        self, record: torch.Tensor, cell: torch.Tensor, gates_above: torch.Tensor, output_above: torch.Tensor
    ) -> None:
        """Use these buffers (see the class docstring), and make the per-column views a step reads."""
        h = self.hidden
        self.record_at = record.unbind(1)
        self.input_at = [column[:, h:] for column in self.record_at]
        self.hidden_at = [column[:, :h] for column in self.record_at]  # hidden_at[j + 1]: h_l2r(i, j)
        self.cell_at = cell.unbind(1)
        self.gates_above_at = gates_above.unbind(1)
        self.output_above_at = output_above.unbind(1)
        self.gates = LSTMGatesAtPixel(record, len(record), hidden=h)

    def __call__(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """The layer's output (B, 2h) at column j of the current row, from its input x (B, 2h) there."""
        self.input_at[j].copy_(x)
        torch.addmm(self.gates_above_at[j], self.record_at[j], self.matrix, out=self.gates.values)
        hidden = self.hidden_at[j + 1]
        self.gates.update(self.cell_at[j], self.cell_at[j + 1], hidden)
        return torch.addmm(self.output_above_at[j], hidden, self.output_matrix)


def stack_layers(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One weight per layer -> (L, ...) for batched matrix products over the layers."""
    return torch.stack(tensors) if tensors else torch.zeros(0)


class CachedDiagonalBiLSTMStepper:
    """Output parameters at one pixel at a time, computing each layer at that pixel only.

    Cached, for all L layers in stacked buffers (L, B, W + 1, F), channels last: per layer the
    left-to-right state of the current row so far and the layer's input along it (``record`` and
    ``cell``, see ``DiagonalBiLSTMLayerAtPosition``), and the right-to-left state of the last finished
    row (``r2l_hidden``, ``r2l_cell``; column W holds the zero state right of the image). Both
    directions' states at row i depend on row i - 1's states and row i's inputs only, so nothing older
    is kept.

    When row i starts (i > 0): the right-to-left pass over the finished row i - 1, from column W - 1 down
    to 0, state from h_r2l(i - 2, j) above and h_r2l(i - 1, j + 1) to the right. Its input-to-state,
    image-to-state and above terms are computed for the whole row and all layers at once (batched
    products), and the recurrence along the row runs for all layers together (each layer's pass reads
    only its own cached inputs, so the layers are independent here): per column one small product per
    layer and one LSTM update, six in-place ops, for all layers. Then, for the
    whole row i and every layer: the left-to-right term from the pixel above, and the right-to-left
    state of row i - 1 through the output convolution (the layer's output at row i adds it, shifted
    down one row; zero for row 0).

    One step computes, at pixel (i, j) only: the first layer (7x7, reading the image); per layer the
    left-to-right gates (mask-B 1x1 input-to-state and the tap to the left, one matrix product that
    also adds the precomputed term from above), c and h (stored into the row buffers) and the 1x1
    output convolution, combined by the stack's residual and skip connections; then the output layers.

    Colours: the steps for R, G and B of a pixel each recompute the pixel from scratch and overwrite its
    cache entries. Every map at (i, j) of colour group g depends, at (i, j), only on the colours before g
    (mask A first, mask B after; the gates are grouped like the hidden state they update; the
    right-to-left part comes from finished rows only), and those are known by step g; so the logits of
    colour g are right, and after the last colour's step the cached values at (i, j) are those of the
    finished image.

    Calls must come in raster order (R, G, B of each pixel, pixels row by row), as ``generate`` makes
    them; the caches start over at (0, 0, colour 0). The weights are copied when the stepper is made.
    """

    def __init__(
        self,
        net: DiagonalBiLSTM,
        label: torch.Tensor | None = None,
        condition: list[torch.Tensor] | None = None,
    ):
        self.stack_input = StackInputAtPosition(net, label, condition)
        self.stack = net.stack
        self.output = net.output.at_position()
        layers = list(net.stack.layers)
        self.layers = [DiagonalBiLSTMLayerAtPosition(layer) for layer in layers]
        self.hidden = h = layers[0].hidden if layers else 0
        # Stacked over layers, each (L, in, out) for batched products, biases (L, 1, out).
        input_weight = [layer.input_to_state.masked_weight().detach()[:, :, 0, 0].t() for layer in layers]
        state_weight = [layer.state_to_state.weight.detach() for layer in layers]  # (8h, h, 2)
        input_bias = [layer.input_to_state.bias.detach()[:, None] for layer in layers]  # (8h, 1)
        self.l2r_above = stack_layers([w[: 4 * h, :, 0].t() for w in state_weight])
        self.l2r_bias = stack_layers([b[: 4 * h].t() for b in input_bias])
        self.r2l_input = stack_layers([w[:, 4 * h :] for w in input_weight])
        image_weight = [layer.image_to_state.weight.detach()[:, :, 0, 0] for layer in layers]  # (4h, C)
        self.r2l_image = stack_layers([w.t() for w in image_weight])
        self.r2l_above = stack_layers([w[4 * h :, :, 0].t() for w in state_weight])
        self.r2l_right_of = [w[4 * h :, :, 1].t().clone() for w in state_weight]  # a list: see right_to_left
        self.r2l_bias = stack_layers([b[4 * h :].t() for b in input_bias])
        self.output_matrix = stack_layers([layer.output_matrix for layer in self.layers])
        self.output_bias = stack_layers([layer.output.bias.detach()[None] for layer in layers])

    def reset(self, batch: int, width: int, index: torch.Tensor | None = None) -> None:
        self.width, h, new = width, self.hidden, self.l2r_bias.new_zeros
        # Class biases of each image's gates, (L, B, 1, 4h) per direction, added to the row terms.
        self.l2r_label_bias = self.r2l_label_bias = None
        if index is not None:
            tables = [layer.class_bias for layer in self.stack.layers]
            biases = torch.stack([table(index).detach() for table in tables])[:, :, None]  # (L, B, 1, 8h)
            self.l2r_label_bias, self.r2l_label_bias = biases[..., : 4 * h], biases[..., 4 * h :]
        shape = (len(self.layers), batch)
        self.record, self.cell = new(*shape, width + 1, 3 * h), new(*shape, width + 1, h)
        self.gates_above, self.output_above = new(*shape, width, 4 * h), new(*shape, width, 2 * h)
        per_layer = zip(self.record, self.cell, self.gates_above, self.output_above, strict=True)
        for layer, buffers in zip(self.layers, per_layer, strict=True):
            layer.bind(*buffers)
        self.r2l_hidden, self.r2l_cell = new(*shape, width + 1, h), new(*shape, width + 1, h)
        self.r2l_hidden_at, self.r2l_cell_at = self.r2l_hidden.unbind(2), self.r2l_cell.unbind(2)
        self.r2l_row_gates = new(*shape, width, 4 * h)
        self.r2l_row_gates_at = self.r2l_row_gates.unbind(2)
        self.r2l_gates = LSTMGatesAtPixel(self.record, *shape, hidden=h)
        self.r2l_gates_of = self.r2l_gates.values.unbind(0)  # (B, 4h) per layer

    def start_row(self, image: torch.Tensor, i: int) -> None:
        """Start row i of the image (B, C, H, W) generated so far: rows up to i - 1 are complete, and so
        are the buffers (nothing of row i has been written yet)."""
        if i > 0:
            self.right_to_left(image[:, :, i - 1])
        num_layers, width, h = len(self.layers), self.width, self.hidden
        # Matrices (L, B * W, F) of the finished row above, for products batched over the layers.
        l2r_above = self.record[:, :, 1:, :h].reshape(num_layers, -1, h)  # h_l2r(i - 1, j)
        r2l_above = self.r2l_hidden[:, :, :width].reshape(num_layers, -1, h)  # h_r2l(i - 1, j)
        gates_above = self.gates_above.view(num_layers, -1, 4 * h)
        torch.baddbmm(self.l2r_bias, l2r_above, self.l2r_above, out=gates_above)
        if self.l2r_label_bias is not None:
            self.gates_above += self.l2r_label_bias
        output_above = self.output_above.view(num_layers, -1, 2 * h)
        torch.baddbmm(self.output_bias, r2l_above, self.output_matrix, out=output_above)

    def right_to_left(self, image_row: torch.Tensor) -> None:
        """The right-to-left states of the finished row i - 1 of every layer, from column W - 1 down to 0,
        into ``r2l_hidden`` and ``r2l_cell`` (which held row i - 2's). ``image_row``: (B, C, W)."""
        num_layers, width, h = len(self.layers), self.width, self.hidden
        # Everything but the recurrence along the row, for all columns at once.
        inputs = self.record[:, :, :width, h:].reshape(num_layers, -1, 2 * h)  # x(i - 1, j)
        above = self.r2l_hidden[:, :, :width].reshape(num_layers, -1, h)  # h_r2l(i - 2, j)
        image = image_row.transpose(1, 2).reshape(-1, image_row.shape[1])  # (B * W, C)
        gates = self.r2l_row_gates.view(num_layers, -1, 4 * h)
        torch.baddbmm(self.r2l_bias, inputs, self.r2l_input, out=gates)
        if self.r2l_label_bias is not None:
            self.r2l_row_gates += self.r2l_label_bias
        gates.baddbmm_(above, self.r2l_above)
        gates += torch.matmul(image, self.r2l_image)
        # Then the recurrence, the LSTM update for all layers at once. The state-to-state products are one
        # addmm per layer: a batched product (bmm) at these sizes enters a parallel region at every call,
        # which costs milliseconds when the CPU is busy.
        for j in reversed(range(width)):
            products = zip(
                self.r2l_row_gates_at[j].unbind(0),
                self.r2l_hidden_at[j + 1].unbind(0),
                self.r2l_right_of,
                self.r2l_gates_of,
                strict=True,
            )
            for row_gates, hidden_right, right, out in products:
                torch.addmm(row_gates, hidden_right, right, out=out)
            self.r2l_gates.update(self.r2l_cell_at[j + 1], self.r2l_cell_at[j], self.r2l_hidden_at[j])

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        """The distribution's parameters (B, P) at pixel (i, j) for colour c's step, given the image ``x``
        (B, C, H, W) generated so far."""
        if (i, j, c) == (0, 0, 0):
            index = self.stack_input.reset(x)
            if self.layers:  # (a stack of no layers has nothing to cache)
                self.reset(len(x), x.shape[3], index)
        if self.layers and (j, c) == (0, 0):
            self.start_row(x, i)
        h, condition = self.stack_input(x, i, j)
        return self.output(stack_at_position(self.stack, h, self.layers, j, condition=condition))
