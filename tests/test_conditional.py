"""Class conditioning for every registered architecture: causal in the image whatever the label, the
label reaching every sub-pixel, cached sampling equal to naive with labels, unconditional nets refusing
labels."""

import pytest
import torch
from causality import assert_causal

from pixel_models.architectures import ARCHITECTURES, build_network
from pixel_models.sampling.generate import NaiveStepper, generate, step_logits, uniform_noise

NUM_CLASSES = 3
NUM_LEVELS = 4


def conditional_net(arch: str, num_channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # Several maps per colour group for C=3: with few, all of a group's maps entering a ReLU can be
    # negative at one pixel for every image of a batch, and a same-pixel gradient there exactly zero.
    hidden = 12 if num_channels == 3 else 4
    net = build_network(
        arch,
        num_channels=num_channels,
        num_levels=NUM_LEVELS,
        hidden=hidden,
        num_layers=2,
        output_hidden=48 if num_channels == 3 else 12,
        num_classes=NUM_CLASSES,
    )
    return net.double().eval()


class WithLabel(torch.nn.Module):
    """The network with its label fixed, for the gradient check (which calls net(x))."""

    def __init__(self, net, label: torch.Tensor):
        super().__init__()
        self.net, self.label = net, label
        self.distribution = net.distribution

    def forward(self, x):
        return self.net(x, self.label.expand(len(x)))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("num_channels", [1, 3])
def test_conditional_net_is_causal_in_the_image(arch, num_channels):
    net = conditional_net(arch, num_channels)
    assert_causal(WithLabel(net, torch.tensor([1])), num_channels, height=4, width=4)
    assert_causal(net, num_channels, height=4, width=4)  # label=None: the "no label" class


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("num_channels", [1, 3])
def test_label_reaches_every_sub_pixel(arch, num_channels):
    net = conditional_net(arch, num_channels)
    x = torch.rand(1, num_channels, 4, 5, dtype=torch.float64).expand(NUM_CLASSES + 1, -1, -1, -1)
    with torch.no_grad():
        logits = net.distribution.log_probs(net(x, torch.arange(NUM_CLASSES + 1)), x)  # (N, K, C, H, W)
    for a in range(NUM_CLASSES + 1):
        for b in range(a):
            differs = (logits[a] - logits[b]).abs().amax(0) > 1e-6  # (C, H, W)
            assert differs.all(), f"classes {a} and {b} give the same logits at {(~differs).nonzero()[:3]}"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("num_channels", [1, 3])
def test_cached_equals_naive_with_labels(arch, num_channels):
    net = conditional_net(arch, num_channels)
    label = torch.tensor([2, 0, NUM_CLASSES])
    image = torch.rand(3, num_channels, 4, 5, dtype=torch.float64)
    x = torch.zeros_like(image)
    cached, naive = net.cached_stepper(label), NaiveStepper(net, label)
    worst = 0.0
    with torch.no_grad():
        for i in range(4):
            for j in range(5):
                for c in range(num_channels):
                    expected = step_logits(net, naive, x, i, j, c)
                    worst = max(worst, (step_logits(net, cached, x, i, j, c) - expected).abs().max().item())
                    x[:, c, i, j] = image[:, c, i, j]
    assert worst < 1e-9
    noise = uniform_noise(3, num_channels, 4, 5, seed=3).double()
    samples = generate(net, noise, NUM_LEVELS, label=label)
    assert torch.equal(samples, generate(net, noise, NUM_LEVELS, method="naive", label=label))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_unconditional_net_refuses_a_label_and_bad_labels_are_refused(arch):
    torch.manual_seed(0)
    net = build_network(arch, num_channels=1, num_levels=2, hidden=4, num_layers=1, output_hidden=4)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))
    net = conditional_net(arch, 1).float()
    with pytest.raises(ValueError, match="classes 0..2"):
        net(torch.rand(2, 1, 4, 4), torch.tensor([0, 7]))
