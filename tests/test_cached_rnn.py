"""The Row LSTM's and Diagonal BiLSTM's cached steppers give exactly the naive sampler's logits and images.

Nets run in float64 so that rounding differences between the two ways of computing the logits
(~1e-16) cannot move a uniform number across a CDF boundary and flip a sample. Images are not square
(rows and columns cannot be swapped unnoticed), in both orientations.
"""

import sys
import time

import pytest
import torch
from helpers import worst_step_difference

from pixel_models.architectures import build_network
from pixel_models.sampling.generate import generate

ARCHITECTURES = ("row_lstm", "diag_bilstm")
SMALL = {"hidden": 6, "num_layers": 2, "output_hidden": 12}
NUM_LEVELS = 4
SHAPES = [(5, 4), (4, 6)]


def small_net(arch: str, num_channels: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL, **overrides}
    return build_network(arch, num_channels=num_channels, num_levels=NUM_LEVELS, **kwargs).double().eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("height, width", SHAPES)
def test_cached_logits_equal_naive_at_every_step(arch, num_channels, height, width):
    net = small_net(arch, num_channels, hidden=12 if num_channels == 3 else 6)
    image = torch.rand(2, num_channels, height, width, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("residual, skip", [(False, False), (False, True), (True, False)])
def test_cached_logits_without_residual_or_skip(arch, residual, skip):
    net = small_net(arch, 3, residual=residual, skip=skip)
    image = torch.rand(2, 3, 4, 6, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


@pytest.mark.parametrize(
    "overrides", [{"kernel_size": 5}, {"kernel_size": 1}, {"num_layers": 1}, {"num_layers": 0}]
)
def test_row_lstm_cached_logits_other_kernels_and_depths(overrides):
    net = small_net("row_lstm", 3, **overrides)
    image = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


@pytest.mark.parametrize("num_layers", [1, 3, 0])
def test_diagonal_bilstm_cached_logits_other_depths(num_layers):
    net = small_net("diag_bilstm", 3, num_layers=num_layers)
    image = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stepper_starts_over_for_a_new_batch_and_shape(arch):
    """The caches start over at (0, 0, 0), whatever batch size and image shape came before."""
    net = small_net(arch, 3)
    stepper = net.cached_stepper()
    for batch, height, width in [(3, 4, 6), (2, 5, 4), (3, 4, 6)]:
        image = torch.rand(batch, 3, height, width, dtype=torch.float64)
        assert worst_step_difference(net, image, stepper=stepper) < 1e-9


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_generation_without_residual_and_skip_equals_naive(arch):
    net = small_net(arch, 3, residual=False, skip=False)
    noise = torch.rand(2, 3, 4, 6)
    naive = generate(net, noise, NUM_LEVELS, method="naive")
    assert torch.equal(generate(net, noise, NUM_LEVELS, method="cached"), naive)
    assert len(naive.unique()) > 1


# ----------------------------------------------------------------------------------------------------
# Speed, not a test: python tests/test_cached_rnn.py [threads]


NUM_LEVELS_MNIST = 2


class StopSampling(Exception):
    pass


def seconds_per_step(net: torch.nn.Module, method: str, noise: torch.Tensor, rows: int) -> float:
    """Seconds per sub-pixel of ``generate`` over the first ``rows`` rows of the image."""
    _, channels, _, width = noise.shape

    def stop_after(i: int) -> None:
        if i + 1 == rows:
            raise StopSampling

    start = time.perf_counter()
    try:
        generate(net, noise, NUM_LEVELS_MNIST, method=method, on_row=stop_after)
    except StopSampling:
        pass
    return (time.perf_counter() - start) / (rows * width * channels)


def main() -> None:
    """Images/s at batch 16, 28x28x1, K=2, the MNIST setup (h=16, 7 layers, 32 output maps): the naive
    sampler timed over the first row and extrapolated (every naive step is the same full pass), the
    cached one over the first four rows."""
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    noise = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    steps = 28 * 28
    for arch in ARCHITECTURES:
        torch.manual_seed(0)
        net = build_network(
            arch, num_channels=1, num_levels=NUM_LEVELS_MNIST, hidden=16, num_layers=7, output_hidden=32
        ).eval()
        seconds_per_step(net, "cached", noise, 1)  # warm-up
        cached = seconds_per_step(net, "cached", noise, 4)
        naive = seconds_per_step(net, "naive", noise, 1)
        print(
            f"{arch}: {torch.get_num_threads()} thread(s), batch 16: cached {cached * 1e3:.2f} ms/step, "
            f"{16 / (cached * steps):.2f} images/s; naive {naive * 1e3:.1f} ms/step, "
            f"{16 / (naive * steps):.4f} images/s; speedup {naive / cached:.0f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
