"""Row LSTM, as in van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.1.

The image is processed one row at a time, top to bottom, a whole row per step. Each layer is an LSTM
whose gates for row i are

    [i, f, o, g] = [sigmoid, sigmoid, sigmoid, tanh](K_is * x_i + K_ss * h_{i-1})
    c_i = f . c_{i-1} + i . g,        h_i = o . tanh(c_i)

with K_is a 1 x k mask-B convolution along row i of the layer input (the pixels to the left and, for
earlier or equal colour groups, the pixel itself) and K_ss an unmasked k-wide convolution along the
previous row's hidden state. The context of a pixel is a triangle above it, widening by k // 2 pixels
per row on each side. A 1x1 mask-B convolution takes the h hidden maps back to the stack's 2h maps.

The network: 7x7 mask-A first layer, ``num_layers`` such layers with residual and skip connections,
ReLU + 1x1 mask-B output layers giving the output distribution's parameters (B, P, H, W) (``distributions``).
Runs at any H and W. Conditional (``num_classes`` > 0): a learned per-class bias on the first layer's output
and on every layer's gates (``blocks.conditioning``).

``RowLSTM.cached_stepper()`` samples without re-running the whole network for every sub-pixel: see
``CachedRowLSTMStepper``.
"""

import torch
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
from pixel_models.blocks.recurrence import lstm_recurrence, row_input_to_state
from pixel_models.distributions import build_distribution


class RowLSTMLayer(nn.Module):
    """One Row LSTM layer: 2h maps in, an LSTM with h hidden maps, 2h maps out (mask-B 1x1)."""

    def __init__(self, hidden: int, num_colors: int, kernel_size: int = 3, num_classes: int = 0):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the row keeps its width, got {kernel_size}")
        self.hidden = hidden
        # out_chunks=4 numbers the colour groups of i, f, o and g separately, so gate feature q of any
        # gate belongs to the same group as hidden feature q, which it multiplies.
        self.input_to_state = MaskedConv2d(
            2 * hidden, 4 * hidden, (1, kernel_size), "B", num_colors, out_chunks=4
        )
        # The previous row lies entirely before the current one in raster order, whatever its colour
        # group, so this convolution needs no mask. No bias: input_to_state already has one.
        self.state_to_state = nn.Conv1d(hidden, 4 * hidden, kernel_size, padding=kernel_size // 2, bias=False)
        self.output = MaskedConv2d(hidden, 2 * hidden, 1, "B", num_colors)
        self.class_bias = class_bias(num_classes, 4 * hidden)  # on the gates

    def gates_in(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The input-to-state part of every row's gates, (B, 4h, H, W): ``input_to_state(x)``, plus the
        class bias of a conditional layer.

        Computed with the taps the mask keeps only (columns j - k//2 .. j; the taps right of the centre
        are masked to zero and skipped), batch innermost in memory (``blocks.recurrence.row_input_to_state``):
        the result is a (B, 4h, H, W) view of a (4h, H, W, B)-ordered buffer, the layout ``recurrence`` reads.
        """
        conv = self.input_to_state
        taps = conv.kernel_size[1] // 2 + 1
        weight = conv.masked_weight()[:, :, 0, :taps]  # (4h, 2h, taps)
        gates = row_input_to_state(x, weight, conv.bias).permute(3, 0, 1, 2)
        if self.class_bias is not None:  # (an elementwise op keeps the batch-innermost layout)
            gates = gates + self.class_bias(label)[:, :, None, None]
        return gates

    def recurrence(self, gates_in: torch.Tensor) -> torch.Tensor:
        """The LSTM's hidden maps (B, h, H, W) from the input-to-state gates (B, 4h, H, W).

        One autograd node (``blocks.recurrence``): rows are the steps, the row's W positions times the
        batch the cells, laid out (4h, H, W, B) so a step reads one contiguous (4h, W * B) slice; the
        state-to-state convolution is one product per tap on the previous row, zero padded by k//2.
        """
        b, four_h, height, width = gates_in.shape
        pad = self.state_to_state.kernel_size[0] // 2
        steps = gates_in.permute(1, 2, 3, 0)[None]  # (1, 4h, H, W, B): a view where gates_in came from above
        weight = self.state_to_state.weight  # (4h, h, k): tap k reads column j - pad + k of the row above
        taps = [weight[None, :, :, k] for k in range(weight.shape[2])]
        hidden = lstm_recurrence(steps, taps, tuple(range(len(taps))), (pad, pad), b)
        rows = hidden[0, :, 1:, pad * b : (pad + width) * b]  # (h, H, W * B)
        return rows.unflatten(2, (width, b)).permute(3, 0, 1, 2)

    def hidden_states(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """The LSTM's hidden maps (B, h, H, W) for a layer input x (B, 2h, H, W) (and class indices)."""
        return self.recurrence(self.gates_in(x, label))

    # Set by the network's ``checkpoint_recurrence``: recompute this layer in the backward pass instead
    # of keeping its activations (gates, cell states: several times its input) from the forward pass.
    recompute_in_backward = False

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute_in_backward and torch.is_grad_enabled():
            return checkpoint(self.compute, x, label, use_reentrant=False)
        return self.compute(x, label)

    def compute(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.hidden_states(x, label))


class RowLSTM(nn.Module):
    """``num_layers`` Row LSTM layers of h hidden maps between the first layer and the output layers."""

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
        kernel_size: int = 3,
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
            [RowLSTMLayer(hidden, num_channels, kernel_size, num_classes) for _ in range(num_layers)],
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
        return self.output(self.stack(h, index, condition=condition))

    def cached_stepper(
        self, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ) -> "CachedRowLSTMStepper":
        return CachedRowLSTMStepper(self, label, condition)


class RowState:
    """A row's LSTM state (cached sampling): ``hidden`` (B, W + 2 * pad, h), zero padded on both sides
    for the state-to-state convolution, and ``cell`` (B, W, h); ``hidden_at[j]`` and ``cell_at[j]`` are
    the (B, h) views of column j, made once so that a step indexes a list, not a tensor."""

    def __init__(self, like: torch.Tensor, batch: int, width: int, hidden: int, pad: int):
        self.hidden = like.new_zeros(batch, width + 2 * pad, hidden)
        self.cell = like.new_zeros(batch, width, hidden)
        self.hidden_at = self.hidden.unbind(1)[pad : pad + width]
        self.cell_at = self.cell.unbind(1)


class RowLSTMLayerAtPosition:
    """A Row LSTM layer at one pixel (cached sampling); keeps the rows it needs (see the stepper below).

    Row buffers, channels last so that a pixel is a contiguous (B, F) slice: ``inputs``, the layer's
    input along the current row after k//2 zero columns (B, k//2 + W, 2h); ``row`` and ``above``, the
    LSTM state of the current row and of the finished row above (``RowState``); ``gates_above``
    (B, W, 4h), the current row's state-to-state term plus the input-to-state bias.
    """

    def __init__(self, layer: RowLSTMLayer):
        self.hidden = h = layer.hidden
        kernel_size = layer.state_to_state.kernel_size[0]
        self.pad = kernel_size // 2
        # Input-to-state: only the taps up to the centre (the rest are masked to zero), as one matrix
        # ordered (tap, feature) like a window of ``inputs``.
        taps = layer.input_to_state.masked_weight().detach()[:, :, 0, : self.pad + 1]  # (4h, 2h, k//2 + 1)
        self.input_matrix = taps.permute(2, 1, 0).reshape(-1, 4 * h)
        self.input_bias = layer.input_to_state.bias.detach().clone()
        # State-to-state: ordered (feature, tap) like a row's hidden state unfolded into k-wide windows.
        self.state_matrix = layer.state_to_state.weight.detach().permute(1, 2, 0).reshape(-1, 4 * h)
        self.output = layer.output.at_position()
        self.class_bias = layer.class_bias

    def reset(self, batch: int, width: int, index: torch.Tensor | None = None) -> None:
        h, pad, like = self.hidden, self.pad, self.input_bias
        # The class bias of each image's gates (B, 1, 4h), added to the row's state term at every row.
        self.label_bias = None if self.class_bias is None else self.class_bias(index).detach()[:, None]
        self.inputs = like.new_zeros(batch, pad + width, 2 * h)
        self.input_at = self.inputs.unbind(1)[pad:]
        # Columns j - k//2 .. j of the input, one (B, (k//2 + 1) * 2h) view per j.
        self.window_at = [self.inputs[:, j : j + pad + 1].view(batch, -1) for j in range(width)]
        self.row, self.above = RowState(like, batch, width, h, pad), RowState(like, batch, width, h, pad)
        self.gates_above = like.new_zeros(batch, width, 4 * h)
        self.gates_above_at = self.gates_above.unbind(1)
        self.gates = LSTMGatesAtPixel(like, batch, hidden=h)

    def start_row(self) -> None:
        """Move on to the next row: the current row's state becomes the row above (zero for row 0, after
        ``reset``); its state-to-state term is computed for the whole new row in one product."""
        self.row, self.above = self.above, self.row
        windows = self.above.hidden.unfold(1, 2 * self.pad + 1, 1)  # (B, W, h, k)
        gates_above = self.gates_above.view(-1, 4 * self.hidden)
        windows = windows.reshape(len(gates_above), -1)  # (B * W, h * k)
        torch.addmm(self.input_bias, windows, self.state_matrix, out=gates_above)
        if self.label_bias is not None:
            self.gates_above += self.label_bias

    def __call__(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """The layer's output (B, 2h) at column j of the current row, from its input x (B, 2h) there."""
        self.input_at[j].copy_(x)
        torch.addmm(self.gates_above_at[j], self.window_at[j], self.input_matrix, out=self.gates.values)
        hidden = self.row.hidden_at[j]
        self.gates.update(self.above.cell_at[j], self.row.cell_at[j], hidden)
        return self.output(hidden)


class CachedRowLSTMStepper:
    """Output parameters at one pixel at a time, computing each layer at that pixel only.

    Cached, per layer (``RowLSTMLayerAtPosition``): the hidden and cell states of the finished row above
    and of the current row so far, and the layer's input along the current row. The Row LSTM's state of
    row i depends on row i - 1's state and row i's input only, so nothing older is kept.

    When row i starts, per layer: the state-to-state term of the whole row, the k-wide convolution of
    the finished hidden state of row i - 1 (one matrix product of its k-wide windows). One step
    computes, at pixel (i, j) only: the first layer (7x7, reading the image); per layer the 1 x k
    input-to-state from the cached input row (columns j - k//2 .. j, the one at j just written: one
    matrix product that also adds the row's state term), the gates, c and h (stored into the row
    buffers) and the 1x1 output convolution, combined by the stack's residual and skip connections;
    then the output layers. About ten small ops per layer instead of a pass over the whole image.

    Colours: the steps for R, G and B of a pixel each recompute the pixel from scratch and overwrite its
    cache entries. Every map at (i, j) of colour group g depends, at (i, j), only on the colours before g
    (mask A first, mask B after; the gates are grouped like the hidden state they update, and the state
    term comes from the finished row above), and those are known by step g; so the logits of colour g
    are right, and after the last colour's step the cached values at (i, j) are those of the finished
    image.

    Calls must come in raster order (R, G, B of each pixel, pixels row by row), as ``generate`` makes
    them; the caches start over at (0, 0, colour 0). The weights are copied when the stepper is made.
    """

    def __init__(
        self, net: RowLSTM, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ):
        self.stack_input = StackInputAtPosition(net, label, condition)
        self.stack = net.stack
        self.layers = [RowLSTMLayerAtPosition(layer) for layer in net.stack.layers]
        self.output = net.output.at_position()

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        """The distribution's parameters (B, P) at pixel (i, j) for colour c's step, given the image ``x``
        (B, C, H, W) generated so far."""
        if (i, j, c) == (0, 0, 0):
            batch, _, _, width = x.shape
            index = self.stack_input.reset(x)
            for layer in self.layers:
                layer.reset(batch, width, index)
        if (j, c) == (0, 0):
            for layer in self.layers:
                layer.start_row()
        h, condition = self.stack_input(x, i, j)
        return self.output(stack_at_position(self.stack, h, self.layers, j, condition=condition))
