"""Gated PixelCNN beyond the contract test (tests/test_contract.py: causality, conditioning, any size,
cached == naive sampling, checkpoints): the exact receptive field (no blind spot), the colour order within
a pixel, and the cached sampler's logits at every step, with and without a label, in other settings.

Nets run in float64, so cached and naive logits agree to ~1e-16.
"""

import pytest
import torch
from causality import assert_causal, input_gradients, logits_of
from helpers import worst_step_difference

from pixel_models.architectures.gated_pixelcnn import GatedPixelCNN
from pixel_models.sampling.generate import generate, uniform_noise

NUM_LEVELS = 4


def small_net(num_channels: int, num_classes: int = 0, **overrides) -> GatedPixelCNN:
    torch.manual_seed(0)
    kwargs = {"hidden": 6, "num_layers": 3, "output_hidden": 12, **overrides}
    net = GatedPixelCNN(num_channels, NUM_LEVELS, num_classes=num_classes, **kwargs)
    return net.double().eval()


def expected_receptive_field(height: int, width: int, reach: int) -> torch.Tensor:
    """Bool (H, W, H, W): output pixel (i, j) sees input pixel (i', j') iff it is on one of the ``reach`` + 1
    rows above within ``reach`` columns either side, or on its own row at most ``reach`` columns to the
    left. Written from the stacks' geometry, not from the network."""
    i, j, i2, j2 = torch.meshgrid(
        torch.arange(height), torch.arange(width), torch.arange(height), torch.arange(width), indexing="ij"
    )
    above = (i - i2 >= 1) & (i - i2 <= reach + 1) & ((j - j2).abs() <= reach)
    left = (i == i2) & (j - j2 >= 1) & (j - j2 <= reach)
    return above | left


@pytest.mark.parametrize(
    "num_layers, kernel_size, first_kernel_size",
    [(1, 3, 3), (1, 3, 7), (2, 3, 3), (3, 3, 3), (2, 5, 3)],
)
@pytest.mark.parametrize("skip", [True, False])
def test_exact_receptive_field_has_no_blind_spot(num_layers, kernel_size, first_kernel_size, skip):
    height, width = 9, 10  # larger than every reach tested, so the field's edges show
    net = small_net(
        1, num_layers=num_layers, kernel_size=kernel_size, first_kernel_size=first_kernel_size, skip=skip
    )
    reach = first_kernel_size // 2 + (num_layers - 1) * (kernel_size // 2)
    assert net.reach() == reach
    seen = input_gradients(net, 1, height, width)[0, :, :, 0] > 0  # (H, W, H, W)
    expected = expected_receptive_field(height, width, reach)
    wrong = (seen != expected).nonzero()
    assert not len(wrong), f"(i, j, i', j') seen != expected at {wrong[:5].tolist()}"
    # No blind spot: the pixel up and to the right, which a masked-convolution PixelCNN of the same depth
    # misses, is seen.
    assert seen[4, 4, 3, 4 + reach]


def test_rgb_receptive_field_and_colour_order():
    # Wide stacks: the output layers start with a ReLU, and with 9 maps all 6 of the R and G groups were
    # negative at one pixel for every image of the batch, making a gradient there exactly zero.
    net = small_net(3, hidden=24, num_layers=2)
    grads = assert_causal(net, 3, height=6, width=6)
    seen_pixels = grads.sum((0, 3)) > 0  # any colour to any colour, (H, W, H, W)
    expected = expected_receptive_field(6, 6, net.reach())
    diagonal = torch.eye(36, dtype=torch.bool).view(6, 6, 6, 6)  # G and B see R (and B sees G) there
    assert torch.equal(seen_pixels, expected | diagonal)
    # Within a pixel: R sees no colour of it, G only R, B R and G.
    same = grads.diagonal(dim1=1, dim2=4).diagonal(dim1=1, dim2=3)  # (C, C, W, H)
    sees = (same > 0).flatten(2).all(2)
    assert torch.equal(sees, torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool))


def test_runs_at_any_size_and_checks_input():
    net = small_net(1, num_layers=2)
    assert logits_of(net, torch.rand(2, 1, 7, 11, dtype=torch.float64)).shape == (2, NUM_LEVELS, 1, 7, 11)
    assert logits_of(net, torch.rand(1, 1, 1, 1, dtype=torch.float64)).shape == (1, NUM_LEVELS, 1, 1, 1)
    with pytest.raises(ValueError, match="num_channels"):
        net(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="odd"):
        GatedPixelCNN(1, 2, kernel_size=4)
    with pytest.raises(ValueError, match="num_layers"):
        GatedPixelCNN(1, 2, num_layers=0)


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("height, width", [(5, 4), (4, 6)])
def test_cached_logits_equal_naive_at_every_step(num_channels, conditional, height, width):
    net = small_net(num_channels, num_classes=4 if conditional else 0, hidden=9 if num_channels == 3 else 6)
    label = torch.tensor([3, 0]) if conditional else None
    image = torch.rand(2, num_channels, height, width, dtype=torch.float64)
    assert worst_step_difference(net, image, label) < 1e-9


@pytest.mark.parametrize(
    "overrides",
    [
        {"residual": False},
        {"skip": False},
        {"num_layers": 1},
        {"kernel_size": 5, "first_kernel_size": 3},
        {"num_output_layers": 1},
    ],
)
def test_cached_logits_other_settings(overrides):
    net = small_net(3, hidden=6, **overrides)
    image = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


def test_stepper_starts_over_for_a_new_batch_and_shape():
    net = small_net(1)
    stepper = net.cached_stepper()
    net.cached_stepper = lambda label=None: stepper  # generate gets the same stepper every time
    for shape in [(2, 1, 4, 5), (3, 1, 6, 3)]:
        noise = uniform_noise(*shape, seed=2).double()
        expected = generate(net, noise, NUM_LEVELS, method="naive")
        assert torch.equal(generate(net, noise, NUM_LEVELS, method="cached"), expected)


def test_bad_labels_are_refused():
    net = small_net(1, num_classes=3).float()
    with pytest.raises(ValueError, match="classes 0..2"):
        net(torch.rand(2, 1, 4, 4), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="LongTensor"):
        net(torch.rand(2, 1, 4, 4), torch.tensor([0.0, 1.0]))
