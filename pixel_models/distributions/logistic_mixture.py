"""The discretized logistic mixture of Salimans, Karpathy, Chen & Kingma, *PixelCNN++* (ICLR 2017),
sections 2.1-2.2.

A pixel's colours share one mixture indicator m ~ pi. Given m, colour c is a logistic with mean mu_{m,c}
and scale s_{m,c}, discretized to K levels: level k is the bin [y_k - 1/(K-1), y_k + 1/(K-1)] around
y_k = 2k/(K-1) - 1 on [-1, 1], the first and last bins open to -inf and +inf, so the K probabilities of
a sub-pixel sum to 1 exactly. For C=3, G's and B's means depend linearly on the pixel's earlier colours
(the paper's coefficients, tanh-squashed): mu_G = mu'_G + alpha * y_R and
mu_B = mu'_B + beta * y_R + gamma * y_G.

The contract asks for the conditionals of one sub-pixel at a time, and they are exact: with the
indicator shared, log p(x_c | x_<c) = logsumexp_m [log w_m(x_<c) + log p_c(x_c | m, x_<c)] with the
posterior weights w_m(x_<c) proportional to pi_m * prod_{c' < c} p_c'(x_c' | m). Their sum over c is the
paper's joint log-likelihood of the pixel, logsumexp_m [log pi_m + sum_c log p_c(x_c | m, x_<c)].

Numerics (float32, also under bf16 autocast: parameters are cast up and autocast is off inside): the
mass of an inner bin, sigmoid(a) - sigmoid(b) with a > b, is taken in log space through the exact
identity sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), i.e.
logsigmoid(a) + logsigmoid(-b) + log(1 - exp(-(a - b))), with a - b (the bin width over the scale) taken
from the log-scale directly and a series for tiny widths: finite and accurate for every a > b, so the
paper's fallback (log-density at the bin centre when the mass is below 1e-5) is not needed; that
fallback is an approximation which would break the K probabilities' sum to 1. Log-scales are clamped at
-7 as in the paper; mixture sums use log-sum-exp.

Parameter maps per pixel (P = M + C * 2M + M * C(C-1)/2 for M = ``num_mixtures``; 3M for C=1, 10M for
C=3): the M mixture logits, then for each colour c its M means, M log-scales and c * M coefficients
(coefficient of colour c on earlier colour c' at ``2M + c' * M + m`` of colour c's block). Colour
groups (``param_groups``): the logits group 0, colour c's block group c.
"""

import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0


class LogisticMixture:
    name = "logistic_mixture"
    reads_earlier_colours = True  # colour c's conditional reads the pixel's earlier colours itself

    def __init__(self, num_channels: int, num_levels: int, num_mixtures: int = 10):
        if num_levels < 2:
            raise ValueError(f"num_levels must be at least 2, got {num_levels}")
        if isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int) or num_mixtures < 1:
            raise ValueError(f"model.output.num_mixtures must be a positive integer, got {num_mixtures!r}")
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_mixtures = num_mixtures
        m = num_mixtures
        self.block_offsets = []  # start of colour c's block (means, log-scales, coefficients)
        offset = m
        for c in range(num_channels):
            self.block_offsets.append(offset)
            offset += (2 + c) * m
        self.num_params = offset

    def config(self) -> dict:
        """Plain values that rebuild this distribution (``model.output``)."""
        return {"name": self.name, "num_mixtures": self.num_mixtures}

    def param_groups(self) -> torch.Tensor:
        """The colour group of each of the ``num_params`` parameter maps."""
        groups = torch.zeros(self.num_params, dtype=torch.long)
        for c, start in enumerate(self.block_offsets):
            groups[start : start + (2 + c) * self.num_mixtures] = c
        return groups

    # ------------------------------------------------------------------------------------------------
    # The mixture, on parameters (B, P, N) and values (B, C, N) for N positions.

    def _check(self, params: torch.Tensor) -> None:
        if params.dim() < 2 or params.shape[1] != self.num_params:
            raise ValueError(
                f"logistic mixture of {self.num_mixtures} components for {self.num_channels} colours "
                f"needs {self.num_params} parameter maps, got {tuple(params.shape)}"
            )

    def _colour(self, params: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and log-scales (B, M, N) of colour c; the means shifted by earlier colours y (B, C, N)."""
        m, start = self.num_mixtures, self.block_offsets[c]
        mean = params[:, start : start + m]
        log_scale = params[:, start + m : start + 2 * m].clamp(min=LOG_SCALE_MIN)
        for earlier in range(c):
            at = start + 2 * m + earlier * m
            mean = mean + torch.tanh(params[:, at : at + m]) * y[:, earlier : earlier + 1]
        return mean, log_scale

    def _log_bin(
        self, y: torch.Tensor, level: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
    ) -> torch.Tensor:
        """log P(bin of ``level``, centred at ``y``) under logistics (mean, log_scale); all broadcast."""
        half_width = 1.0 / (self.num_levels - 1)
        inv_scale = torch.exp(-log_scale)
        upper = (y + half_width - mean) * inv_scale
        lower = (y - half_width - mean) * inv_scale
        below_upper = F.logsigmoid(upper)  # log CDF(upper edge)
        above_lower = F.logsigmoid(-lower)  # log (1 - CDF(lower edge))
        # log(1 - exp(-a)) for a = upper - lower = the bin's width in scales, taken from log_scale (no
        # cancellation, no underflow to a = 0 for huge scales); a series where a is tiny.
        log_width = math.log(2 * half_width) - log_scale
        width = torch.exp(log_width)
        tiny = width < 1e-3
        safe = torch.where(tiny, torch.ones_like(width), width)  # keeps the unused branch's gradient finite
        log_gap = torch.where(
            tiny, log_width - width / 2 + width * width / 24, torch.log(-torch.expm1(-safe))
        )
        inner = below_upper + above_lower + log_gap
        first, last = level == 0, level == self.num_levels - 1
        return torch.where(first, below_upper, torch.where(last, above_lower, inner))

    def _observed(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p_c(x_c | m, x_<c) of the values x (B, C, N) in [0, 1]: (B, C, M, N)."""
        y = 2 * x - 1
        level = torch.round(x * (self.num_levels - 1)).clamp_(0, self.num_levels - 1)
        return torch.stack(
            [
                self._log_bin(y[:, c : c + 1], level[:, c : c + 1], *self._colour(params, y, c))
                for c in range(self.num_channels)
            ],
            1,
        )

    def _log_weights(self, params: torch.Tensor, observed: torch.Tensor, c: int) -> torch.Tensor:
        """log w_m(x_<c): the indicator's posterior given the pixel's colours before c, (B, M, N)."""
        logits = params[:, : self.num_mixtures]
        if c > 0:
            logits = logits + observed[:, :c].sum(1)
        return torch.log_softmax(logits, 1)

    def _levels_of_colour(self, params: torch.Tensor, x: torch.Tensor, c: int, observed) -> torch.Tensor:
        """log p(x_c = k | x_<c) for every level k: (B, K, N)."""
        k = self.num_levels
        grid = torch.arange(k, device=params.device)
        y_grid = (2 * grid.to(params.dtype) / (k - 1) - 1)[None, None, :, None]
        mean, log_scale = self._colour(params, 2 * x - 1, c)
        per_level = self._log_bin(y_grid, grid[None, None, :, None], mean[:, :, None], log_scale[:, :, None])
        log_weights = self._log_weights(params, observed, c)
        return torch.logsumexp(log_weights[:, :, None] + per_level, 1)

    @staticmethod
    def _compute_dtype(params: torch.Tensor) -> torch.dtype:
        return torch.float64 if params.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------------------------------------
    # The distribution's interface.

    def log_probs(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Parameters (B, P, H, W) and the image x (B, C, H, W) in [0, 1] -> normalized log-probabilities
        (B, K, C, H, W) of the K levels of every sub-pixel, colour c given the image's own earlier colours."""
        self._check(params)
        b, _, height, width = params.shape
        with torch.autocast(params.device.type, enabled=False):
            params = params.to(self._compute_dtype(params)).flatten(2)
            x = x.to(params.dtype).flatten(2)
            observed = self._observed(params, x)
            out = torch.stack(
                [self._levels_of_colour(params, x, c, observed) for c in range(self.num_channels)], 2
            )
        return out.view(b, self.num_levels, self.num_channels, height, width)

    def nll_per_subpixel(self, params: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """-log p(x_c | x_<c) of each observed level, in nats, float32 (float64 for float64 params):
        (B, C, H, W)."""
        self._check(params)
        if params.shape[0] != levels.shape[0] or params.shape[2:] != levels.shape[2:]:
            raise ValueError(f"parameters {tuple(params.shape)} do not match images {tuple(levels.shape)}")
        if levels.shape[1] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} colours, got images {tuple(levels.shape)}")
        b, _, height, width = params.shape
        with torch.autocast(params.device.type, enabled=False):
            params = params.to(self._compute_dtype(params)).flatten(2)
            x = levels.flatten(2).to(params.dtype) / (self.num_levels - 1)
            observed = self._observed(params, x)
            nll = torch.stack(
                [
                    -torch.logsumexp(self._log_weights(params, observed, c) + observed[:, c], 1)
                    for c in range(self.num_channels)
                ],
                1,
            )
        return nll.view(b, self.num_channels, height, width)

    def nll(self, params: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """-log p(x) in nats of each image (B,), float32 (also under bf16 autocast)."""
        return self.nll_per_subpixel(params, levels).flatten(1).sum(1)

    def logits_at(self, params_at: torch.Tensor, pixel: torch.Tensor, c: int) -> torch.Tensor:
        """Parameters at one pixel (B, P) -> log-probabilities (B, K) of colour c given the pixel's earlier
        colours ``pixel[:, :c]`` ((B, C) in [0, 1]; later colours are not read)."""
        self._check(params_at)
        params = params_at.to(self._compute_dtype(params_at))[:, :, None]
        x = pixel.to(params.dtype)[:, :, None]
        observed = self._observed(params, x) if c > 0 else None
        return self._levels_of_colour(params, x, c, observed)[:, :, 0]
