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
    assert torch.equal(logits, expected["logits"])
    assert module.distribution.name == "categorical" and not module.conditional
