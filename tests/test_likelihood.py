import math

import pytest
import torch

from pixel_models.training.likelihood import SplitNLL, bits_per_dim, nll_per_image


@pytest.mark.parametrize("channels,levels,size", [(1, 2, 28), (3, 256, 32), (1, 17, 8)])
def test_uniform_logits_score_log_k_per_sub_pixel(channels, levels, size):
    logits = torch.zeros(4, levels, channels, size, size)
    images = torch.randint(0, levels, (4, channels, size, size))
    nll = nll_per_image(logits, images)
    dims = channels * size * size
    assert torch.allclose(nll, torch.full((4,), dims * math.log(levels)), rtol=1e-6)
    assert bits_per_dim(float(nll[0]), dims) == pytest.approx(math.log2(levels), rel=1e-6)


def test_binarized_mnist_uniform_is_784_ln2_nats_and_cifar_is_8_bits():
    assert float(
        nll_per_image(torch.zeros(1, 2, 1, 28, 28), torch.zeros(1, 1, 28, 28).long())
    ) == pytest.approx(784 * math.log(2), rel=1e-6)
    nats = float(nll_per_image(torch.zeros(1, 256, 3, 32, 32), torch.zeros(1, 3, 32, 32).long()))
    assert bits_per_dim(nats, 3 * 32 * 32) == pytest.approx(8.0, rel=1e-6)


def test_nll_matches_explicit_log_softmax():
    logits = torch.randn(2, 5, 3, 4, 4)
    images = torch.randint(0, 5, (2, 3, 4, 4))
    log_p = torch.log_softmax(logits, dim=1).gather(1, images[:, None]).squeeze(1)
    assert torch.allclose(nll_per_image(logits, images), -log_p.flatten(1).sum(1), atol=1e-5)


def test_split_nll_is_exact_with_an_uneven_last_batch():
    values = torch.rand(10, dtype=torch.float64) * 100
    split = SplitNLL(10)
    for batch in torch.arange(10).split(4):  # 4, 4, 2
        split.update(values[batch], batch)
    assert split.mean() == pytest.approx(float(values.mean()), rel=1e-12)
    mean_of_batch_means = float(torch.stack([values[b].mean() for b in torch.arange(10).split(4)]).mean())
    assert split.mean() != pytest.approx(mean_of_batch_means, rel=1e-6)


def test_split_nll_counts_a_padded_repeat_once():
    values = torch.arange(5, dtype=torch.float64)
    split = SplitNLL(5)
    split.update(values[[0, 1, 2]], torch.tensor([0, 1, 2]))
    split.update(values[[3, 4, 0]], torch.tensor([3, 4, 0]))  # a distributed sampler's padding repeats 0
    assert split.mean() == pytest.approx(2.0)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        nll_per_image(torch.zeros(2, 2, 1, 8, 8), torch.zeros(2, 1, 7, 8).long())
