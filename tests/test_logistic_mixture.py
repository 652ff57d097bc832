"""The discretized logistic mixture: normalized over the K levels, equal to an independent implementation
of the paper's likelihood, exact at the edge bins, stable in float32 and under bf16, and selectable by
config for every architecture. (Causality and cached == naive sampling with the mixture, for every
architecture and C=1 and 3, are in test_contract.py.)"""

import math

import pytest
import torch
from helpers import ROOT, compose_train
from hydra.utils import instantiate

from pixel_models.distributions import build_distribution
from pixel_models.distributions.logistic_mixture import LogisticMixture


def random_params(dist, batch=2, height=3, width=4, spread=2.0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return spread * torch.randn(batch, dist.num_params, height, width, generator=generator, dtype=dtype)


def random_levels(num_channels, num_levels, batch=2, height=3, width=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_levels, (batch, num_channels, height, width), generator=generator)


def reference_pixel_nll(params: torch.Tensor, levels: torch.Tensor, num_mixtures: int, num_levels: int):
    """-log p(pixel) as in the paper (Salimans et al. 2017, eq. 2-3, and its code), pixel by pixel, in
    float64 with plain sigmoid differences: logsumexp_m [log pi_m + sum_c log P(x_c | m, x_<c)].
    params: (P,) laid out [logits | per colour: means, log-scales, coefficients]; levels: (C,)."""
    m, num_channels = num_mixtures, len(levels)
    y = [2.0 * int(level) / (num_levels - 1) - 1.0 for level in levels]
    log_pi = torch.log_softmax(params[:m], 0)
    total = log_pi.clone()
    offset = m
    for c in range(num_channels):
        means = params[offset : offset + m].clone()
        log_scales = params[offset + m : offset + 2 * m].clamp(min=-7.0)
        for earlier in range(c):
            coefficient = torch.tanh(
                params[offset + 2 * m + earlier * m : offset + 2 * m + (earlier + 1) * m]
            )
            means = means + coefficient * y[earlier]
        offset += (2 + c) * m
        scales = torch.exp(log_scales)
        upper = torch.sigmoid((y[c] + 1.0 / (num_levels - 1) - means) / scales)
        lower = torch.sigmoid((y[c] - 1.0 / (num_levels - 1) - means) / scales)
        if levels[c] == 0:
            prob = upper
        elif levels[c] == num_levels - 1:
            prob = 1.0 - lower
        else:
            prob = upper - lower
        total = total + torch.log(prob)
    return -torch.logsumexp(total, 0)


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_probabilities_sum_to_one_per_subpixel(num_channels, num_levels):
    dist = LogisticMixture(num_channels, num_levels, num_mixtures=4)
    for spread in (0.5, 3.0, 20.0):  # moderate, wide, and extreme means and scales
        params = random_params(dist, spread=spread)
        x = random_levels(num_channels, num_levels).double() / (num_levels - 1)
        probs = dist.log_probs(params, x).exp()
        assert probs.shape == (2, num_levels, num_channels, 3, 4)
        torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_nll_equals_the_papers_likelihood_and_the_gathered_log_probs(num_channels, num_levels):
    mixtures = 3
    dist = LogisticMixture(num_channels, num_levels, num_mixtures=mixtures)
    params = random_params(dist, spread=1.5)
    levels = random_levels(num_channels, num_levels)
    nll = dist.nll(params, levels)
    reference = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                reference[b] += reference_pixel_nll(
                    params[b, :, i, j], levels[b, :, i, j], mixtures, num_levels
                )
    torch.testing.assert_close(nll, reference, rtol=0, atol=1e-5)
    # The contract's per-sub-pixel conditionals, gathered at the observed levels, give the same NLL.
    log_probs = dist.log_probs(params, levels.double() / (num_levels - 1))
    gathered = log_probs.gather(1, levels[:, None]).squeeze(1)
    torch.testing.assert_close(-gathered.flatten(1).sum(1), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(dist.nll_per_subpixel(params, levels), -gathered, rtol=0, atol=1e-9)
    # float32 training NLL: the same to float32 precision.
    torch.testing.assert_close(dist.nll(params.float(), levels).double(), reference, rtol=1e-5, atol=1e-4)


def test_colour_conditionals_are_the_indicators_posterior():
    """p(G | R) marginalizes the shared indicator with weights pi_m p(R | m), not pi_m: checked against the
    ratio of the joint p(R, G) to the marginal p(R), both computed by summing the paper's joint."""
    k, m = 5, 3
    dist = LogisticMixture(2, k, num_mixtures=m)
    params = random_params(dist, batch=1, height=1, width=1, spread=1.5)
    joint = torch.zeros(k, k, dtype=torch.float64)
    for r in range(k):
        for g in range(k):
            joint[r, g] = torch.exp(-reference_pixel_nll(params[0, :, 0, 0], torch.tensor([r, g]), m, k))
    torch.testing.assert_close(joint.sum(), torch.tensor(1.0, dtype=torch.float64))
    for r in range(k):
        pixel = torch.tensor([[r / (k - 1), 0.0]], dtype=torch.float64)
        conditional = dist.logits_at(params[:, :, 0, 0], pixel, 1).exp()[0]
        torch.testing.assert_close(conditional, joint[r] / joint[r].sum(), rtol=0, atol=1e-12)
        marginal = dist.logits_at(params[:, :, 0, 0], pixel, 0).exp()[0]
        torch.testing.assert_close(marginal, joint.sum(1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_levels", [2, 256])
def test_edge_bins_are_open_to_infinity(num_levels):
    dist = LogisticMixture(1, num_levels, num_mixtures=1)
    mean, log_scale = 0.3, -1.2
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64)[None, :, None, None]
    probs = dist.log_probs(params, torch.zeros(1, 1, 1, 1, dtype=torch.float64)).exp()[0, :, 0, 0, 0]
    scale = math.exp(log_scale)
    half = 1.0 / (num_levels - 1)
    expected_first = 1 / (1 + math.exp(-((-1 + half - mean) / scale)))
    expected_last = 1 - 1 / (1 + math.exp(-((1 - half - mean) / scale)))
    assert probs[0].item() == pytest.approx(expected_first, abs=1e-14)
    assert probs[-1].item() == pytest.approx(expected_last, abs=1e-14)
    if num_levels == 2:  # both bins are edge bins, split at 0
        assert probs[0].item() == pytest.approx(1 / (1 + math.exp(mean / scale)), abs=1e-14)


def test_float32_is_stable_for_extreme_parameters_and_bf16_gives_float32():
    dist = LogisticMixture(3, 256, num_mixtures=5)
    params64 = random_params(dist, spread=1.0)
    params64[:, 5:] *= 60  # means far outside [-1, 1], log-scales clamped at -7 and very large
    levels = random_levels(3, 256)
    params32 = params64.float().requires_grad_()
    nll32 = dist.nll(params32, levels)
    nll32.sum().backward()
    assert torch.isfinite(nll32).all() and torch.isfinite(params32.grad).all()
    torch.testing.assert_close(nll32.double(), dist.nll(params64, levels), rtol=1e-5, atol=1e-3)
    assert torch.isfinite(dist.log_probs(params64.float(), levels / 255.0)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll_bf16 = dist.nll(params32.detach().bfloat16(), levels)
    assert nll_bf16.dtype == torch.float32
    torch.testing.assert_close(nll_bf16, dist.nll(params32.detach().bfloat16().float(), levels))


def test_logits_at_equals_log_probs_at_the_pixel():
    dist = LogisticMixture(3, 17, num_mixtures=4)
    params = random_params(dist)
    x = random_levels(3, 17).double() / 16
    log_probs = dist.log_probs(params, x)
    for c in range(3):
        at = dist.logits_at(params[:, :, 1, 2], x[:, :, 1, 2], c)
        torch.testing.assert_close(at, log_probs[:, :, c, 1, 2], rtol=0, atol=1e-12)


def test_parameter_layout_and_groups():
    dist = LogisticMixture(3, 256, num_mixtures=10)
    assert dist.num_params == 100  # the paper's 10 per component for RGB
    groups = dist.param_groups()
    assert groups[:10].eq(0).all() and groups[10:30].eq(0).all()
    assert groups[30:60].eq(1).all() and groups[60:100].eq(2).all()
    assert LogisticMixture(1, 2, num_mixtures=4).num_params == 12
    assert dist.config() == {"name": "logistic_mixture", "num_mixtures": 10}


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="num_mixtures"):
        build_distribution({"name": "logistic_mixture", "num_mixtures": 0}, 3, 256)
    with pytest.raises(ValueError, match="num_mixtures"):
        build_distribution({"name": "logistic_mixture", "num_mixtures": 2.5}, 3, 256)
    with pytest.raises(ValueError, match="model.output.mixtures"):
        build_distribution({"name": "logistic_mixture", "mixtures": 3}, 3, 256)
    # Another distribution's setting is left out, so model.output.name alone switches.
    assert build_distribution({"name": "categorical", "num_mixtures": 10}, 3, 256).config() == {
        "name": "categorical"
    }
    dist = LogisticMixture(3, 256, num_mixtures=2)
    with pytest.raises(ValueError, match="parameter maps"):
        dist.nll(torch.zeros(1, 7, 2, 2), torch.zeros(1, 3, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_config_selects_the_mixture_for_every_architecture(model):
    net = {"pixelcnn_pp": "model.net.num_filters=8"}.get(model, "model.net.hidden=6")
    cfg = compose_train(
        f"model={model}",
        "data=cifar10",
        "model.output.name=logistic_mixture",
        "model.output.num_mixtures=4",
        net,
    )
    module = instantiate(cfg.model)
    assert isinstance(module.distribution, LogisticMixture) and module.distribution.num_mixtures == 4
    levels = torch.randint(0, 256, (2, 3, 32, 32))
    nll = module.nll(levels)
    assert nll.shape == (2,) and nll.dtype == torch.float32 and torch.isfinite(nll).all()
    nll.mean().backward()
