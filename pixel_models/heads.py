"""Pieces every architecture of *Pixel Recurrent Neural Networks* (van den Oord et al., 2016) shares.

- the first layer: a 7x7 mask-A convolution from the C input colours to 2h feature maps;
- the stack of layers with the paper's residual connections (a layer's 2h-map output is added to its
  input) and skip connections (every layer's output is summed into the output layers' input);
- the output layers: ReLU + 1x1 mask-B convolutions, the last giving a K-way softmax's logits for every
  sub-pixel, returned as (B, K, C, H, W).
"""

import torch
from torch import nn

from pixel_models.masks import MaskedConv2d


def check_input(x: torch.Tensor, num_channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != num_channels:
        raise ValueError(
            f"expected images of shape (B, {num_channels}, H, W) with values in [0, 1], got {tuple(x.shape)}; "
            f"check that data.num_channels matches the model's num_channels"
        )


class FirstLayer(MaskedConv2d):
    """7x7 mask-A convolution: a sub-pixel never sees itself or anything after it."""

    def __init__(self, num_channels: int, out_features: int, kernel_size: int = 7):
        super().__init__(num_channels, out_features, kernel_size, "A", num_channels)


class ResidualSkipStack(nn.Module):
    """Runs ``layers`` (each mapping 2h maps to 2h maps) with switchable residual and skip connections."""

    def __init__(self, layers: list[nn.Module], residual: bool = True, skip: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.residual = residual
        self.skip = skip

    def combine(self, layer_input: torch.Tensor, layer_output: torch.Tensor) -> torch.Tensor:
        return layer_input + layer_output if self.residual else layer_output

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        skip_sum = 0
        for layer in self.layers:
            h = self.combine(h, layer(h))
            if self.skip:
                skip_sum = skip_sum + h
        return skip_sum if self.skip else h


class OutputLayers(nn.Module):
    """ReLU + 1x1 mask-B convolutions; the last one gives C*K logits, viewed as (B, K, C, H, W)."""

    def __init__(self, in_features: int, hidden_features: int, num_colors: int, num_levels: int, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_output_layers must be at least 1, got {num_layers}")
        widths = [in_features] + [hidden_features] * (num_layers - 1) + [num_colors * num_levels]
        self.convs = nn.ModuleList(
            MaskedConv2d(widths[i], widths[i + 1], 1, "B", num_colors) for i in range(num_layers)
        )
        self.num_colors = num_colors
        self.num_levels = num_levels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            h = conv(torch.relu(h))
        b, _, height, width = h.shape
        # Interleaved groups: feature k * C + c is level k of colour c (see masks.channel_groups).
        return h.view(b, self.num_levels, self.num_colors, height, width)
