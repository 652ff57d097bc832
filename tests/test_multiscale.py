"""Multi-Scale PixelRNN: the NLL is the honest NLL of the full image, the generation order is respected, and
sampling goes small image first. (Causality, any size, cached == naive: tests/test_contract.py.)"""

import pytest
import torch
from causality import allowed_inputs, assert_causal

from pixel_models.architectures.multiscale import MultiScalePixelRNN
from pixel_models.sampling.generate import generate
from pixel_models.training.module import AutoregressiveModule

SMALL_NET = {"hidden": 12, "num_layers": 2, "output_hidden": 48}


def multiscale(base="row_lstm", channels=1, num_levels=4, **kwargs):
    torch.manual_seed(0)
    settings = {"base": base, "image_size": 6, "small_size": 3, **SMALL_NET, **kwargs}
    return MultiScalePixelRNN(channels, num_levels, **settings)


def test_nll_is_small_image_nll_plus_conditional_nll_off_the_grid():
    net = multiscale(channels=3).double()
    levels = torch.randint(0, 4, (3, 3, 6, 6))
    x = levels.double() / 3
    nll = net.distribution.nll(net(x), levels)
    # Independently: the small network on the subsampled image, the conditional network elsewhere.
    small_levels = levels[:, :, ::2, ::2]
    small = net.small.distribution.nll(net.small(small_levels.double() / 3), small_levels)
    per_subpixel = net.large.distribution.nll_per_subpixel(
        net.large(x, None, net.condition_maps(x[:, :, ::2, ::2])), levels
    )
    off_grid = torch.ones(6, 6, dtype=torch.bool)
    off_grid[::2, ::2] = False
    conditional = (per_subpixel * off_grid).flatten(1).sum(1)
    assert torch.allclose(nll, small + conditional, rtol=0, atol=1e-4)  # (the NLL is summed in float32)


def test_the_model_is_causal_in_its_generation_order_not_in_raster_order():
    net = multiscale().double().eval()
    grads = assert_causal(net, 1, 6, 6)  # in the generation order: passes
    raster_leaks = (grads > 0) & ~allowed_inputs(1, 6, 6)
    # Pixel (0, 1) reads the small image, whose pixel (0, 2) comes later in raster order.
    assert raster_leaks[0, 0, 1, 0, 0, 2]
    # Grid pixels see the small image only: (2, 2) does not read the off-grid pixel (1, 1) before it.
    assert grads[0, 2, 2, 0, 1, 1] == 0 and grads[0, 2, 2, 0, 0, 0] > 0


@pytest.mark.parametrize("base", ["diag_bilstm", "pixelcnn"])
@pytest.mark.parametrize("channels", [1, 3])
def test_other_bases_are_causal_and_sample_cached_as_naive(base, channels):
    net = multiscale(base, channels).double().eval()
    assert_causal(net, channels, 6, 6)
    noise = torch.rand(2, channels, 6, 6)
    assert torch.equal(generate(net, noise, 4, method="cached"), generate(net, noise, 4, method="naive"))


def test_sampling_draws_the_small_image_first_with_the_small_network():
    net = multiscale().double().eval()
    noise = torch.rand(3, 1, 6, 6)
    levels = generate(net, noise, 4)
    small = generate(net.small, noise[:, :, ::2, ::2], 4)
    assert torch.equal(levels[:, :, ::2, ::2], small)


def test_completion_keeps_known_pixels():
    net = multiscale().double().eval()
    known = torch.randint(0, 4, (2, 1, 6, 6))
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, :3] = True
    levels = generate(net, torch.rand(2, 1, 6, 6), 4, known=known, known_mask=mask)
    assert torch.equal(levels[mask], known[mask])


def test_sizes_and_settings_that_do_not_fit_are_clear_errors():
    with pytest.raises(ValueError, match="small_size=5 must divide the image size 6"):
        multiscale(small_size=5)
    with pytest.raises(ValueError, match="multiples of 2"):
        multiscale()(torch.rand(1, 1, 5, 6))
    with pytest.raises(ValueError, match="model.net.base"):
        multiscale(base="multiscale")


def test_the_module_trains_a_step_and_is_conditional_too():
    module = AutoregressiveModule(
        {"arch": "multiscale", "base": "row_lstm", "image_size": 6, "small_size": 3, **SMALL_NET},
        num_channels=1,
        num_levels=4,
        image_size=6,
        conditional=True,
        num_classes=3,
    )
    batch = {
        "levels": torch.randint(0, 4, (4, 1, 6, 6)),
        "index": torch.arange(4),
        "label": torch.arange(4) % 3,
    }
    loss = module.nll(batch["levels"], module.batch_label(batch, training=True)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in module.net.upsample.parameters())
