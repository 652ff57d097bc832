"""Multi-Scale PixelRNN, as in van den Oord et al., *Pixel Recurrent Neural Networks* (2016), section 3.5.

An unconditional network (any registered base: ``row_lstm``, ``diag_bilstm``, ``pixelcnn``, ...) generates a
small s x s image; a conditional network of the same base then generates the n x n image, every one of its
layers biased by a map that an upsampling (deconvolution) network computes from the small image.

The small image is the large one subsampled: pixel (a, b) of the small image is pixel (a * f, b * f) of the
large one, f = n / s (``image_size / small_size``, fixed when the network is built; any image whose sides
are multiples of f runs). So that the likelihood is an honest NLL of the full image, those pixels are
predicted once, by the small network, and the conditional network predicts only the others:

    -log p(x) = -log p_small(x[::f, ::f])
                - sum over (i, j) off the grid of log p_cond(x_ij | x_<ij, x[::f, ::f])

with x_<ij the pixels before (i, j) in raster order (and the earlier colours of (i, j)). This is the
autoregressive factorization in the model's *generation order*: the grid pixels first (in raster order of
the small image), then every other pixel in raster order; the conditional network reads the whole small
image, all of which comes before every pixel it predicts, and never a pixel it has yet to predict
(``generation_order`` gives the order; tested by gradients). ``forward`` returns, at grid pixels, the small
network's parameters and elsewhere the conditional network's, so the distribution's NLL of the returned
parameters is exactly the sum above, and (B, K, C, H, W) logits come out as for any network.

Conditioning: the upsampling network (a 3x3 convolution of the small image, a transposed convolution of
stride f, ReLU) gives one map of the stack's width for the first layer's output and for every layer's
input (``blocks.layers.ResidualSkipStack``'s ``condition``), so it enters each layer's input-to-state term.

Sampling: ``generate_levels`` samples the small image with the small network's sampler (cached or naive),
then the large image with the conditional network's, its grid pixels given (as in completion).
"""

import torch
from torch import nn

from pixel_models.blocks.layers import check_input


def check_size(height: int, width: int, factor: int) -> None:
    if height % factor or width % factor:
        raise ValueError(
            f"the Multi-Scale PixelRNN subsamples by {factor} (model.net.image_size / model.net.small_size): "
            f"image height and width must be multiples of {factor}, got {height}x{width}"
        )


def generation_order(height: int, width: int, factor: int) -> torch.Tensor:
    """The rank of each pixel (H, W) in the generation order: grid pixels first, then the rest, raster."""
    check_size(height, width, factor)
    on_grid = torch.zeros(height, width, dtype=torch.bool)
    on_grid[::factor, ::factor] = True
    raster = torch.arange(height * width).view(height, width)
    keys = torch.where(on_grid, raster, raster + height * width).flatten()
    return keys.argsort().argsort().view(height, width)


class MultiScalePixelRNN(nn.Module):
    """``small`` and ``large`` networks of architecture ``base`` (both built with ``base_settings``), the
    upsampling network between them, and one output distribution for both."""

    def __init__(
        self,
        num_channels: int,
        num_levels: int,
        base: str = "row_lstm",
        image_size: int = 32,
        small_size: int = 16,
        upsampler_hidden: int = 32,
        output: dict | None = None,
        num_classes: int = 0,
        **base_settings,
    ):
        super().__init__()
        from pixel_models.architectures import ARCHITECTURES  # the registry imports this file

        if base not in ARCHITECTURES or base == "multiscale":
            choices = sorted(a for a in ARCHITECTURES if a != "multiscale")
            raise ValueError(f"unknown model.net.base={base!r}; choose one of {choices}")
        if not 1 <= small_size <= image_size or image_size % small_size:
            raise ValueError(
                f"model.net.small_size={small_size} must divide the image size {image_size} "
                f"(e.g. 16 or 32 for 64x64 images)"
            )
        self.factor = image_size // small_size
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.small_size = small_size
        network = ARCHITECTURES[base]
        kwargs = {"num_channels": num_channels, "num_levels": num_levels, "output": output}
        self.small = network(**kwargs, num_classes=num_classes, **base_settings)
        self.large = network(**kwargs, num_classes=num_classes, **base_settings)
        self.distribution = self.large.distribution
        width = self.large.first.out_channels  # the stack's 2h maps
        num_maps = 1 + len(self.large.stack.layers)  # the first layer's output, then every layer's input
        self.width, self.num_maps = width, num_maps
        self.read_small = nn.Conv2d(num_channels, upsampler_hidden, 3, padding=1)
        self.upsample = nn.ConvTranspose2d(
            upsampler_hidden, upsampler_hidden, self.factor, stride=self.factor
        )
        self.to_maps = nn.Conv2d(upsampler_hidden, num_maps * width, 1)

    def condition_maps(self, small_x: torch.Tensor) -> list[torch.Tensor]:
        """The small image (B, C, s, s') in [0, 1] -> ``num_maps`` maps (B, 2h, s * f, s' * f)."""
        features = torch.relu(self.upsample(torch.relu(self.read_small(small_x))))
        return list(self.to_maps(features).chunk(self.num_maps, dim=1))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> parameters (B, P, H, W): the small network's at the grid
        pixels, the conditional network's elsewhere (see the module docstring)."""
        check_input(x, self.num_channels)
        factor = self.factor
        check_size(x.shape[2], x.shape[3], factor)
        small_x = x[:, :, ::factor, ::factor]
        params = self.large(x, label, self.condition_maps(small_x))
        params = params.clone()
        params[:, :, ::factor, ::factor] = self.small(small_x, label)
        return params

    def generation_order(self, height: int, width: int) -> torch.Tensor:
        return generation_order(height, width, self.factor)

    def generate_levels(self, noise, num_levels, temperature, method, known, known_mask, on_row, label):
        """``sampling.generate`` for this model: the small image, then the large one given it."""
        from pixel_models.sampling.generate import generate

        batch, channels, height, width = noise.shape
        factor = self.factor
        check_size(height, width, factor)
        if (known is None) != (known_mask is None):
            raise ValueError("completion needs both known and known_mask")
        small_known = None if known is None else known[:, :, ::factor, ::factor]
        small_mask = None if known_mask is None else known_mask[:, :, ::factor, ::factor]
        small = generate(
            self.small,
            noise[:, :, ::factor, ::factor],
            num_levels,
            temperature,
            method,
            small_known,
            small_mask,
            label=label,
        )
        small_x = small.to(device=noise.device, dtype=self.to_maps.weight.dtype) / (num_levels - 1)
        condition = self.condition_maps(small_x)
        given = torch.zeros(noise.shape, dtype=torch.long, device=noise.device)
        given[:, :, ::factor, ::factor] = small.to(noise.device)
        given_mask = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
        given_mask[:, :, ::factor, ::factor] = True
        if known is not None:
            given = torch.where(known_mask.to(noise.device).bool(), known.to(noise.device).long(), given)
            given_mask |= known_mask.to(noise.device).bool()
        return generate(
            self.large, noise, num_levels, temperature, method, given, given_mask, on_row, label, condition
        )
