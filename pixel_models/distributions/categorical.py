"""The K-way softmax over a sub-pixel's levels, as in van den Oord et al., *Pixel Recurrent Neural Networks*
(2016), section 5.3: the network gives K logits per sub-pixel, and -log p(x) is their cross-entropy with
the observed levels.

Parameter maps are interleaved like every other layer's colour groups (``blocks.masks.channel_groups``):
map ``k * C + c`` is the logit of level ``k`` of colour ``c`` and belongs to colour group ``c``, so colour c's
logits see the pixel's earlier colours only.
"""

import torch
import torch.nn.functional as F


class Categorical:
    name = "categorical"

    def __init__(self, num_channels: int, num_levels: int):
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_params = num_levels * num_channels

    def config(self) -> dict:
        """Plain values that rebuild this distribution (``model.output``)."""
        return {"name": self.name}

    def param_groups(self) -> torch.Tensor:
        """The colour group of each of the ``num_params`` parameter maps."""
        return torch.arange(self.num_params) % self.num_channels

    def log_probs(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Parameters (B, P, H, W) -> logits (B, K, C, H, W) over the K levels of every sub-pixel.

        ``x`` (the image in [0, 1]) is not needed: colour c's logits come from maps of group c."""
        b, _, height, width = params.shape
        return params.view(b, self.num_levels, self.num_channels, height, width)

    def nll_per_subpixel(self, params: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """-log p of each observed level, in nats, float32: (B, C, H, W)."""
        logits = self.log_probs(params, levels)
        if logits.shape[0] != levels.shape[0] or logits.shape[2:] != levels.shape[1:]:
            raise ValueError(f"logits {tuple(logits.shape)} do not match images {tuple(levels.shape)}")
        return F.cross_entropy(logits.float(), levels.long(), reduction="none")

    def nll(self, params: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """-log p(x) in nats of each image (B,), float32 (also under bf16 autocast)."""
        return self.nll_per_subpixel(params, levels).flatten(1).sum(1)

    def logits_at(self, params_at: torch.Tensor, pixel: torch.Tensor, c: int) -> torch.Tensor:
        """Parameters at one pixel (B, P) -> logits (B, K) of colour c. ``pixel``: (B, C) in [0, 1], the
        pixel's colours generated so far (unused here)."""
        return params_at.view(len(params_at), self.num_levels, self.num_channels)[:, :, c]
