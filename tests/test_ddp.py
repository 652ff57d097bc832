"""Several processes report exactly the metrics of one: every image counted once, padding or not.

DDP runs are subprocesses (`python train.py trainer=ddp_sim ...`, 2 CPU processes over gloo) with
timeouts: Lightning's `ddp` re-runs the command line for its other process, which must not be pytest.
"""

import json
from pathlib import Path

from datamodules.digits import DigitsDataModule
from tests.helpers import (  # tests.: subprocesses import this file
    TINY_RUN,
    compose_train,
    run_script,
)

ODD_DIGITS = "tests.test_ddp.OddDigits"


class OddDigits(DigitsDataModule):
    """The digits with 299 validation and 297 test images: 2 processes cannot share them evenly, so the
    DistributedSampler pads each split with a repeated image, which must not count twice."""

    def setup(self, stage=None):
        super().setup(stage)
        for split, size in (("val", 299), ("test", 297)):
            self.splits[split], self.labels[split] = self.splits[split][:size], self.labels[split][:size]


def make_cfg(out, *overrides):
    return compose_train(
        f"output_dir={out}",
        *TINY_RUN,
        f"data._target_={ODD_DIGITS}",
        *overrides,
    )


def run_train(cfg):
    from train import train

    return train(cfg)


def train_py(run_dir, *args, timeout=240):
    result = run_script(
        "train.py",
        "callbacks.progress_bar=null",
        "callbacks.sample_grid=null",
        "final_samples=0",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *args,
        timeout=timeout,
    )
    return result, json.loads((Path(run_dir) / "metrics.json").read_text())


def test_two_processes_evaluate_a_checkpoint_exactly_as_one(tmp_path):
    run_train(make_cfg(tmp_path / "train", "debug=fast", "test=false"))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"

    run_train(make_cfg(tmp_path / "one", "train=false", f"ckpt_path={ckpt}"))
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    # batches of 7: each process's 150 images end in a short batch, and one of them is the padding
    result, two = train_py(
        tmp_path / "two",
        "trainer=ddp_sim",
        "train=false",
        f"ckpt_path={ckpt}",
        f"data._target_={ODD_DIGITS}",
        "data.batch_size=7",
    )

    assert (one["world_size"], two["world_size"]) == (1, 2)
    for stage, count in (("val", 299), ("test", 297)):
        assert one[f"{stage}/num_images"] == two[f"{stage}/num_images"] == count
        assert abs(one[f"{stage}/nll"] - two[f"{stage}/nll"]) < 1e-5, stage
        assert abs(one[f"{stage}/bpd"] - two[f"{stage}/bpd"]) < 1e-6, stage
    # the evaluation says what it measured, once (rank zero)
    assert result.stderr.count("validation NLL:") + result.stdout.count("validation NLL:") == 1
    assert "over 299 images" in result.stdout + result.stderr


def test_two_processes_train_checkpoint_and_test(tmp_path):
    # each process trains on its own half of every epoch (ResumableTrainOrder shards the training order)
    _, metrics = train_py(
        tmp_path / "run",
        "trainer=ddp_sim",
        "debug=fast",
        "trainer.limit_val_batches=null",
        "trainer.limit_test_batches=null",
        timeout=400,
    )
    assert metrics["world_size"] == 2 and metrics["global_step"] == 3
    assert metrics["val/num_images"] == metrics["test/num_images"] == 300
    from pixel_models.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
