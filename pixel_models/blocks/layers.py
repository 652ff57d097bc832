"""Pieces every architecture of *Pixel Recurrent Neural Networks* (van den Oord et al., 2016) shares.

- the first layer: a 7x7 mask-A convolution from the C input colours to 2h feature maps;
- the stack of layers with the paper's residual connections (a layer's 2h-map output is added to its
  input) and skip connections (every layer's output is summed into the output layers' input);
- the output layers: ReLU + 1x1 mask-B convolutions, the last giving the output distribution's parameter
  maps (B, P, H, W) (for the K-way softmax, P = K * C logits; see ``distributions``).

The stack's input is the first layer's output plus, in a conditional network, the class bias and the
Multi-Scale PixelRNN's first condition map: ``stack_input`` over the whole image, ``StackInputAtPosition``
at one pixel. Cached samplers evaluate the first and the output layers at one pixel at a time:
``FirstLayer.at_position`` and ``OutputLayers.at_position`` (built on ``masks.ConvAtPosition``).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pixel_models.blocks.conditioning import class_index
from pixel_models.blocks.masks import ConvAtPosition, MaskedConv2d


def check_input(x: torch.Tensor, num_channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != num_channels:
        raise ValueError(
            f"expected images of shape (B, {num_channels}, H, W) with values in [0, 1], "
            f"got {tuple(x.shape)}; check that data.num_channels matches the model's num_channels"
        )


class FirstLayer(MaskedConv2d):
    """7x7 mask-A convolution: a sub-pixel never sees itself or anything after it."""

    def __init__(self, num_channels: int, out_features: int, kernel_size: int = 7):
        super().__init__(num_channels, out_features, kernel_size, "A", num_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels != 1 or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        # Training on one input map (MNIST): the convolution as one product per image on the unfolded
        # image (its windows of kernel rows 0 .. kh // 2, zero padded above and at the sides). oneDNN's
        # weight gradient is slow for a single input channel: this takes 40% off the layer's forward and
        # backward on CPU (the image needs no gradient, so nothing is folded back). Forward only, the
        # convolution is faster.
        kh, kw = self.kernel_size
        b, _, height, width = x.shape
        windows = F.unfold(F.pad(x, (kw // 2, kw // 2, kh // 2, 0)), (kh // 2 + 1, kw))  # (B, rows kw, H W)
        weight = self.kept_rows_weight().flatten(1).expand(b, -1, -1)
        return torch.baddbmm(self.bias[:, None], weight, windows).view(b, -1, height, width)

    def at_position(self) -> "FirstLayerAtPosition":
        return FirstLayerAtPosition(self)


class FirstLayerAtPosition(ConvAtPosition):
    """The first layer at one pixel, reading the image being generated (cached sampling).

    Its cache is a zero-padded copy of the image. Each call copies in the rows i - kh//2 .. i that the
    kernel reads, so the result depends only on the ``x`` passed in, whatever was called before; the
    copy is a few rows of C maps, cheap next to the layers above.
    """

    def __init__(self, conv: FirstLayer):
        super().__init__(conv)
        self.image: torch.Tensor | None = None

    def features(self, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """(B, F_out) features at pixel (i, j) of the image ``x`` (B, C, H, W) generated so far."""
        batch, _, height, width = x.shape
        padded = (batch, height + self.pad_top, width + 2 * self.pad_side)
        if self.image is None or self.image.shape[:3] != padded:
            self.image = self.new_cache(batch, height, width)
        first = max(0, i - self.pad_top)
        self.write_rows(self.image, first, x[:, :, first : i + 1])
        return self.at(self.image, i, j)


def stack_input(
    net: nn.Module, x: torch.Tensor, label: torch.Tensor | None, condition: list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """What the stack of ``net`` (a network with ``first``, ``first_bias``, ``num_channels`` and
    ``num_classes``) takes for images x (B, C, H, W): its input ``first(x)`` plus the class bias and
    ``condition[0]`` (B, 2h, H, W); the class indices (B,) (None when unconditional); and the layers'
    condition maps ``condition[1:]`` (None without ``condition``)."""
    check_input(x, net.num_channels)
    index = class_index(label, len(x), net.num_classes, x.device)
    h = net.first(x)
    if net.first_bias is not None:
        h = h + net.first_bias(index)[:, :, None, None]
    if condition is None:
        return h, index, None
    return h + condition[0], index, condition[1:]


class StackInputAtPosition:
    """``stack_input`` at one pixel (cached sampling), for a network ``net`` as there: ``reset(x)`` at the
    first step, then one call per step."""

    def __init__(self, net: nn.Module, label: torch.Tensor | None, condition: list[torch.Tensor] | None):
        self.first = net.first.at_position()
        self.first_bias_table = net.first_bias
        self.num_classes = net.num_classes
        self.label = label
        self.first_bias: torch.Tensor | None = None
        # Condition maps channels last, so that a pixel's values are one contiguous (L + 1, B, 2h) slice.
        self.condition = (
            None if condition is None else torch.stack(condition).permute(0, 1, 3, 4, 2).contiguous()
        )

    def reset(self, x: torch.Tensor) -> torch.Tensor | None:
        """At the first step: the first layer's class bias for the images x (B, C, H, W) being generated,
        and their class indices (B,) for the layers' own biases (None when unconditional)."""
        index = class_index(self.label, len(x), self.num_classes, x.device)
        self.first_bias = None if index is None else self.first_bias_table(index).detach()
        return index

    def __call__(self, x: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stack's input (B, 2h) at pixel (i, j) of the image ``x`` (B, C, H, W) generated so far,
        and the layers' condition maps there ((L, B, 2h), None without ``condition``)."""
        h = self.first.features(x, i, j)
        if self.first_bias is not None:
            h = h + self.first_bias
        if self.condition is None:
            return h, None
        condition = self.condition[:, :, i, j]
        return h + condition[0], condition[1:]


class ResidualSkipStack(nn.Module):
    """Runs ``layers`` (each mapping 2h maps to 2h maps) with switchable residual and skip connections.

    Residual: a layer's output is added to its input. Skip: every layer's output (learnable through the
    layer's last 1x1 convolution) is summed into the output layers' input; without skips the output
    layers read the last layer's result. ``context`` is passed to every layer unchanged (the Diagonal
    BiLSTM's right-to-left direction reads the image; conditional networks pass the class index).
    ``condition``: one map (B, 2h, H, W) per layer, added to that layer's input (not to the residual path):
    how the Multi-Scale PixelRNN's conditional network is biased by the small image, so that the map reaches
    every layer's input-to-state term.
    """

    def __init__(self, layers: list[nn.Module], residual: bool = True, skip: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual = residual
        self.skip = skip

    def forward(self, h: torch.Tensor, *context, condition: list[torch.Tensor] | None = None) -> torch.Tensor:
        skip_sum = torch.zeros_like(h) if self.skip and len(self.layers) else None
        for n, layer in enumerate(self.layers):
            out = layer(h if condition is None else h + condition[n], *context)
            h = h + out if self.residual else out
            if skip_sum is not None:
                skip_sum = skip_sum + out
        return h if skip_sum is None else skip_sum


def stack_at_position(
    stack: ResidualSkipStack, h: torch.Tensor, layer_steps, *context, condition: list | None = None
) -> torch.Tensor:
    """``stack.forward`` at one pixel (cached sampling), with the same residual and skip connections.

    ``h``: the stack's input (B, 2h) at the pixel; ``layer_steps``: one callable per layer of the stack,
    ``step(h, *context) -> (B, 2h)``, giving that layer's output at the pixel; ``condition``: each layer's
    condition map at the pixel (B, 2h), or None.
    """
    skip_sum = None
    for n, step in enumerate(layer_steps):
        out = step(h if condition is None else h + condition[n], *context)
        h = h + out if stack.residual else out
        if stack.skip:
            skip_sum = out if skip_sum is None else skip_sum + out
    return h if skip_sum is None else skip_sum


class OutputLayers(nn.Module):
    """ReLU + 1x1 mask-B convolutions; the last one gives the distribution's ``num_params`` maps, each masked
    as the colour group the distribution gives it (``param_groups()``): (B, P, H, W)."""

    def __init__(
        self, in_features: int, hidden_features: int, num_colors: int, distribution, num_layers: int = 2
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_output_layers must be at least 1, got {num_layers}")
        widths = [in_features] + [hidden_features] * (num_layers - 1) + [distribution.num_params]
        groups = [None] * (num_layers - 1) + [distribution.param_groups()]
        self.convs = nn.ModuleList(
            MaskedConv2d(widths[i], widths[i + 1], 1, "B", num_colors, out_groups=groups[i])
            for i in range(num_layers)
        )
        self.num_colors = num_colors

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            h = conv(torch.relu(h))
        return h

    def at_position(self) -> "OutputLayersAtPosition":
        return OutputLayersAtPosition(self)


class OutputLayersAtPosition:
    """The output layers at one pixel (cached sampling): (B, in_features) -> parameters (B, P).

    1x1 convolutions need no cache: each is one addmm on the pixel's features (``ConvAtPosition``).
    """

    def __init__(self, output: OutputLayers):
        self.convs = [conv.at_position() for conv in output.convs]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            h = conv(torch.relu(h))
        return h
