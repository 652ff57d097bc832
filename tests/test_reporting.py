"""Every number train.py reports says whose it is, and nats and bits/dim reported together agree."""

import json
import math
import re

import lightning as L
import pytest
import torch
from helpers import TINY_RUN, compose_train

from datamodules.digits import DigitsDataModule
from pixel_models.training.checkpoint import load_checkpoint, load_module
from pixel_models.training.likelihood import nll_per_image

DIMS = 1 * 8 * 8  # digits: C * H * W


class SpoilLastEpoch(L.Callback):
    """Adds noise to the weights before the last epoch's validation: the best epoch is then not the last,
    which is where a report mixing the two shows."""

    def __init__(self, last_epoch: int):
        self.last_epoch = last_epoch

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.last_epoch and not trainer.sanity_checking:
            noise = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in pl_module.net.parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=noise))


def exact_nll(ckpt_path, split: str) -> float:
    """The checkpoint's NLL over the whole split, computed here independently of train.py."""
    module = load_module(ckpt_path)
    data = DigitsDataModule()
    data.setup()
    levels = data.splits[split]
    with torch.no_grad():
        return float(nll_per_image(module(levels.float() / 16), levels).double().mean())


def test_reported_pairs_agree_and_name_their_checkpoint(tmp_path, caplog):
    from train import train

    cfg = compose_train(
        f"output_dir={tmp_path}", *TINY_RUN, "trainer.max_epochs=2", "trainer.limit_train_batches=2"
    )
    with caplog.at_level("INFO", logger="train"):
        returned = train(cfg, extra_callbacks=[SpoilLastEpoch(last_epoch=1)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    # every (nll, bpd) pair reported together is one measurement: bpd = nll / (C H W ln 2)
    pairs = [k[: -len("nll")] for k in metrics if k.endswith("nll") and k[: -len("nll")] + "bpd" in metrics]
    for prefix in pairs:
        assert metrics[prefix + "bpd"] == pytest.approx(
            metrics[prefix + "nll"] / (DIMS * math.log(2)), rel=1e-12
        )
    assert {"val/", "best/val/", "last/val/", "test/"} <= set(pairs)
    # ... and so is every pair printed in the final report
    printed = re.findall(r"([\d.]+) nats/image = ([\d.]+) bits/dim", caplog.text)
    assert len(printed) >= 3
    for nats, bits in printed:
        assert float(bits) == pytest.approx(float(nats) / (DIMS * math.log(2)), abs=2e-6)

    # the best checkpoint is epoch 0's; val/*, best/* and test/* are all its own, exact over the split
    assert (metrics["best/epoch"], metrics["last/epoch"]) == (0, 1)
    assert metrics["best/checkpoint"] == metrics["checkpoint"] == metrics["test/checkpoint"]
    assert "epoch000" in metrics["best/checkpoint"] and metrics["test/epoch"] == 0
    assert metrics["val/nll"] == metrics["best/val/nll"] == returned
    assert metrics["best/val/nll"] < metrics["last/val/nll"]
    assert metrics["best/val/nll"] == pytest.approx(exact_nll(metrics["best/checkpoint"], "val"), rel=1e-6)
    assert metrics["test/nll"] == pytest.approx(exact_nll(metrics["best/checkpoint"], "test"), rel=1e-6)
    # last.ckpt is the last validation's weights, also when that validation was no new best
    assert metrics["last/checkpoint"].endswith("last.ckpt")
    assert load_checkpoint(metrics["last/checkpoint"])["global_step"] == metrics["last/global_step"] == 4
    assert metrics["last/val/nll"] == pytest.approx(exact_nll(metrics["last/checkpoint"], "val"), rel=1e-6)
    assert metrics["val/num_images"] == metrics["test/num_images"] == 300
    assert (metrics["global_step"], metrics["epochs"]) == (4, 2)
    assert metrics["params"] == sum(p.numel() for p in load_module(metrics["checkpoint"]).parameters())
    assert "(best checkpoint, epoch 0, step 2)" in caplog.text
