"""PixelCNN++ beyond the contract (test_contract.py has causality, any size, cached == naive, checkpoints):
no blind spot, the size rule, the cached sampler at the paper's depth pattern and with the masked head,
and the configs."""

import pytest
import torch
from causality import allowed_inputs, input_gradients
from helpers import compose_train, worst_step_difference
from hydra.utils import instantiate

from pixel_models.architectures.pixelcnn_pp import PixelCNNPP
from pixel_models.sampling.generate import generate
from pixel_models.training.module import AutoregressiveModule

MIXTURE = {"name": "logistic_mixture", "num_mixtures": 2}


def test_every_earlier_pixel_reaches_the_output():
    """No blind spot: with two blocks per stage every pixel before (i, j) in raster order moves its output."""
    torch.manual_seed(0)
    net = PixelCNNPP(1, num_levels=4, num_filters=12, num_resnet=2, num_stages=3, output=MIXTURE).eval()
    grads = input_gradients(net.double(), 1, 8, 8)
    allowed = allowed_inputs(1, 8, 8)
    assert not ((grads > 0) & ~allowed).any()
    assert ((grads > 0) == allowed).all(), f"blind spots at {((grads == 0) & allowed).nonzero()[:5].tolist()}"


def test_sizes_that_do_not_fit_the_stages_are_clear_errors():
    net = PixelCNNPP(1, num_levels=4, num_filters=6, num_resnet=1, num_stages=3)
    with pytest.raises(ValueError, match=r"divisible by 2 \*\* \(num_stages - 1\) = 4, got 6x8"):
        net(torch.rand(1, 1, 6, 8))
    PixelCNNPP(1, num_levels=4, num_filters=6, num_resnet=1, num_stages=2)(torch.rand(1, 1, 6, 8))
    with pytest.raises(ValueError, match="divisible by .* = 4, got 30x30"):
        AutoregressiveModule({"arch": "pixelcnn_pp", "num_filters": 6}, 1, 4, image_size=30)
    with pytest.raises(ValueError, match="divisible"):
        generate(net.eval(), torch.rand(1, 1, 6, 8), 4, method="cached")
    for key, value in [("num_stages", 0), ("num_resnet", 1.5), ("dropout", 1.0)]:
        with pytest.raises(ValueError, match=key):
            PixelCNNPP(1, num_levels=4, **{key: value})


@pytest.mark.parametrize(
    "channels, output", [(3, {"name": "logistic_mixture", "num_mixtures": 3}), (3, {"name": "categorical"})]
)
def test_cached_logits_equal_naive_at_every_step(channels, output):
    """Two blocks per stage, three stages (two rows at the smallest), dropout (off in eval) and a label:
    the cached stepper's logits agree with a full pass at every step to 1e-10, and the samples are
    identical. (The contract test adds non-square images, completion and C=1.)"""
    torch.manual_seed(0)
    net = PixelCNNPP(
        channels, 256, num_filters=8, num_resnet=2, num_stages=3, dropout=0.5, output=output, num_classes=2
    )
    net = net.double().eval()
    label = torch.tensor([0, 2])
    height, width = 8, 8
    image = torch.rand(2, channels, height, width, dtype=torch.float64)
    assert worst_step_difference(net, image, label) < 1e-10
    noise = torch.rand(2, channels, height, width)
    samples = generate(net, noise, 256, method="cached", label=label)
    assert torch.equal(samples, generate(net, noise, 256, method="naive", label=label))
    assert len(samples.unique()) > 10


def test_the_stepper_starts_over_for_a_new_batch_and_size():
    torch.manual_seed(0)
    net = PixelCNNPP(1, 4, num_filters=6, num_resnet=1, num_stages=2, output=MIXTURE).double().eval()
    stepper = net.cached_stepper()
    net.cached_stepper = lambda label=None: stepper
    for batch, size in [(3, (4, 6)), (2, (6, 4))]:
        noise = torch.rand(batch, 1, *size)
        assert torch.equal(generate(net, noise, 4, method="cached"), generate(net, noise, 4, method="naive"))


def test_configs():
    cfg = compose_train("model=pixelcnn_pp")
    assert cfg.model.output.name == "logistic_mixture" and cfg.model.net.num_stages == 3
    module = instantiate(compose_train("model=pixelcnn_pp", "model.output.name=categorical").model)
    assert module.distribution.config() == {"name": "categorical"}
    assert module.net.pixel_head is False  # digits: one colour, nothing of the pixel to read
    cfg = compose_train("experiment=cifar10_pixelcnn_pp")
    net = cfg.model.net
    assert (net.arch, net.num_filters, net.num_resnet, net.num_stages, net.dropout) == (
        "pixelcnn_pp",
        160,
        5,
        3,
        0.5,
    )
    assert (cfg.model.output.name, cfg.model.output.num_mixtures) == ("logistic_mixture", 10)
    assert (cfg.data.image_size, cfg.data.num_channels) == (32, 3)
