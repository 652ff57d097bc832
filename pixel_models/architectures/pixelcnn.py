"""PixelCNN, as in van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.5.

A 7x7 mask-A convolution, then residual blocks (Figure 5: ReLU, 1x1 conv 2h->h, ReLU, 3x3 conv h->h,
ReLU, 1x1 conv h->2h, all mask B, added to the block's input), then ReLU + 1x1 mask-B output layers giving
the output distribution's parameters (``distributions``; by default a K-way softmax per sub-pixel). Fully
convolutional, so it runs at any H and W. Conditional (``num_classes`` > 0): a learned per-class bias on the
first layer's output and on every block's 1x1 reduction (``blocks.conditioning``).

``PixelCNN.cached_stepper()`` samples without re-running the whole network for every sub-pixel: see
``CachedPixelCNNStepper``.
"""

import torch
from torch import nn

from pixel_models.blocks.conditioning import class_bias
from pixel_models.blocks.layers import (
    FirstLayer,
    OutputLayers,
    ResidualSkipStack,
    StackInputAtPosition,
    stack_at_position,
    stack_input,
)
from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.distributions import build_distribution


class ResidualBlock(nn.Module):
    """The block's branch (the stack adds the input back): 2h -> h -> h (3x3) -> 2h, mask B."""

    def __init__(self, hidden: int, num_colors: int, kernel_size: int = 3, num_classes: int = 0):
        super().__init__()
        self.reduce = MaskedConv2d(2 * hidden, hidden, 1, "B", num_colors)
        self.conv = MaskedConv2d(hidden, hidden, kernel_size, "B", num_colors)
        self.expand = MaskedConv2d(hidden, 2 * hidden, 1, "B", num_colors)
        self.class_bias = class_bias(num_classes, hidden)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        x = self.reduce(torch.relu(x))
        if self.class_bias is not None:
            x = x + self.class_bias(label)[:, :, None, None]
        x = self.conv(torch.relu(x))
        return self.expand(torch.relu(x))


class PixelCNN(nn.Module):
    """``num_layers`` residual blocks of width h between the mask-A first layer and the output layers."""

    def __init__(
        self,
        num_channels: int,
        num_levels: int,
        hidden: int = 16,
        num_layers: int = 7,
        output_hidden: int = 32,
        num_output_layers: int = 2,
        residual: bool = True,
        skip: bool = False,
        output: dict | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.distribution = build_distribution(output, num_channels, num_levels)
        self.first = FirstLayer(num_channels, 2 * hidden)
        self.first_bias = class_bias(num_classes, 2 * hidden)
        blocks = [ResidualBlock(hidden, num_channels, num_classes=num_classes) for _ in range(num_layers)]
        self.stack = ResidualSkipStack(blocks, residual=residual, skip=skip)
        self.output = OutputLayers(
            2 * hidden, output_hidden, num_channels, self.distribution, num_output_layers
        )

    def forward(
        self, x: torch.Tensor, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> the distribution's parameters (B, P, H, W). ``condition``: maps
        (B, 2h, H, W) added to the first layer's output and to each layer's input (Multi-Scale PixelRNN)."""
        h, index, condition = stack_input(self, x, label, condition)
        return self.output(self.stack(h, index, condition=condition))

    def cached_stepper(
        self, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ) -> "CachedPixelCNNStepper":
        return CachedPixelCNNStepper(self, label, condition)


class ResidualBlockAtPosition:
    """A residual block at one pixel; caches the input of its 3x3 convolution (see the stepper below)."""

    def __init__(self, block: ResidualBlock):
        self.reduce = block.reduce.at_position()
        self.conv = block.conv.at_position()
        self.expand = block.expand.at_position()
        self.class_bias = block.class_bias
        self.cache: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def reset(self, batch: int, height: int, width: int, index: torch.Tensor | None) -> None:
        self.cache = self.conv.new_cache(batch, height, width)
        self.bias = None if self.class_bias is None else self.class_bias(index).detach()

    def __call__(self, h: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """The block's branch output (B, 2h) at pixel (i, j), from the block's input h (B, 2h) there."""
        reduced = self.reduce(torch.relu(h))
        if self.bias is not None:
            reduced += self.bias
        self.conv.write(self.cache, i, j, torch.relu_(reduced))
        return self.expand(torch.relu_(self.conv.at(self.cache, i, j)))


class CachedPixelCNNStepper:
    """Output parameters at one pixel at a time, computing every layer at that pixel only.

    Cached, per residual block: the input of its 3x3 convolution, relu(reduce(relu(h))), at every pixel
    done so far (zero padded, channels last: (B, H + 1, W + 2, h), see ``ConvAtPosition``). Every other
    layer is 1x1 and so needs its input at (i, j) only, which the step computes anyway; the 7x7 first
    layer reads the image itself. One step computes, at pixel (i, j) only: the first layer; per block the
    1x1 reduce (written into the block's cache), the 3x3 convolution (reading cache rows i-1..i, which
    are final: in raster order they hold earlier pixels and (i, j) itself) and the 1x1 expand, combined
    by the stack's residual and skip connections; then the output layers. A few (B, ~100) x (~100, 2h)
    matrix products per layer instead of a pass over the whole image.

    Colours: the steps for R, G and B of a pixel each recompute the pixel from scratch and overwrite its
    cache entries. Colour group g only depends on the colours before g, which are known by step g, so
    after the last colour's step the cached values at (i, j) are those of the finished image.

    Calls must come in raster order (R, G, B of each pixel, pixels row by row), as ``generate`` makes
    them; the caches start over at (0, 0, colour 0). The weights are copied when the stepper is made.
    """

    def __init__(
        self, net: PixelCNN, label: torch.Tensor | None = None, condition: list[torch.Tensor] | None = None
    ):
        self.stack_input = StackInputAtPosition(net, label, condition)
        self.stack = net.stack
        self.blocks = [ResidualBlockAtPosition(block) for block in net.stack.layers]
        self.output = net.output.at_position()

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        """The distribution's parameters (B, P) at pixel (i, j) for colour c's step, given the image ``x``
        (B, C, H, W) generated so far."""
        if (i, j, c) == (0, 0, 0):
            batch, _, height, width = x.shape
            index = self.stack_input.reset(x)
            for block in self.blocks:
                block.reset(batch, height, width, index)
        h, condition = self.stack_input(x, i, j)
        return self.output(stack_at_position(self.stack, h, self.blocks, i, j, condition=condition))
