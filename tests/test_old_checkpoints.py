"""Checkpoints written before the layout change (version 0.1.0: flat ``pixel_models``, networks returning
(B, K, C, H, W) logits) still load and give the same logits."""

from pathlib import Path

import torch

from pixel_models.training.checkpoint import load_module

DATA = Path(__file__).parent / "data"


def test_a_v0_1_0_checkpoint_loads_and_gives_the_same_logits():
    module = load_module(DATA / "v0_1_0_pixelcnn_digits.ckpt")  # written by train.py at commit d987a74
    expected = torch.load(DATA / "v0_1_0_pixelcnn_digits_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = module(expected["input"])
    # The expected logits were computed on another CPU: float32 convolutions sum in a different order
    # on different vector units (6e-8 apart on an AVX2 machine, logits up to 0.54), while a weight
    # loaded wrongly moves them by orders of magnitude more.
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-6, atol=1e-6)
    assert module.distribution.name == "categorical" and not module.conditional
