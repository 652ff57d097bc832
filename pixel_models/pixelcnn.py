"""PixelCNN, as in van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.5.

A 7x7 mask-A convolution, then residual blocks (Figure 5: ReLU, 1x1 conv 2h->h, ReLU, 3x3 conv h->h,
ReLU, 1x1 conv h->2h, all mask B, added to the block's input), then ReLU + 1x1 mask-B output layers and
a K-way softmax per sub-pixel. Fully convolutional, so it runs at any H and W.
"""

import torch
from torch import nn

from pixel_models.heads import FirstLayer, OutputLayers, ResidualSkipStack, check_input
from pixel_models.masks import MaskedConv2d


class ResidualBlock(nn.Module):
    """The block's branch (the stack adds the input back): 2h -> h -> h (3x3) -> 2h, mask B."""

    def __init__(self, hidden: int, num_colors: int, kernel_size: int = 3):
        super().__init__()
        self.reduce = MaskedConv2d(2 * hidden, hidden, 1, "B", num_colors)
        self.conv = MaskedConv2d(hidden, hidden, kernel_size, "B", num_colors)
        self.expand = MaskedConv2d(hidden, 2 * hidden, 1, "B", num_colors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(torch.relu(x))
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
    ):
        super().__init__()
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.first = FirstLayer(num_channels, 2 * hidden)
        self.stack = ResidualSkipStack(
            [ResidualBlock(hidden, num_channels) for _ in range(num_layers)], residual=residual, skip=skip
        )
        self.output = OutputLayers(2 * hidden, output_hidden, num_channels, num_levels, num_output_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.num_channels)
        return self.output(self.stack(self.first(x)))
