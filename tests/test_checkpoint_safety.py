"""Checkpoints are written atomically, never hold diverged weights, survive SIGTERM, and load safely."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ONE_THREAD, ROOT, TINY_RUN, compose_train, run_script

import pixel_models.training.faults as faults
from pixel_models.training.checkpoint import CheckpointError, load_checkpoint, load_module
from pixel_models.training.faults import AtomicCheckpointIO, NonFiniteError


def make_cfg(out, *overrides):
    return compose_train(
        f"output_dir={out}",
        *TINY_RUN,
        "test=false",
        *overrides,
    )


def run_train(cfg):
    from train import train

    return train(cfg)


# ------------------------------------------------------------------------------------ atomic writes
def test_a_failure_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the writer dies
        raise OSError("No space left on device")

    monkeypatch.setattr(faults.torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_non_finite_weights_are_never_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(NonFiniteError, match="refusing to write .*w hold NaN"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(2))


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_cfg(
        tmp_path,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.max_epochs=3",
        "+callbacks.nan._target_=pixel_models.training.faults.InjectNonFinite",
        "+callbacks.nan.step=3",
    )
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 3 \(epoch 1, batch 1\)") as err:
        run_train(cfg)
    assert "last.ckpt" in str(err.value)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best_epoch000.ckpt", "last.ckpt"]
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


# --------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_during_training_saves_a_checkpoint_then_exits(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "trainer=cpu",
            "trainer.max_epochs=10000",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "model.net.hidden=4",
            "callbacks.progress_bar=null",
            "callbacks.sample_grid=null",
            "final_samples=0",
            "test=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=ONE_THREAD,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), "training never wrote its first checkpoint"
        time.sleep(0.5)  # well into a later epoch
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    interrupted = load_checkpoint(run_dir / "checkpoints" / "interrupted.ckpt")
    assert interrupted["global_step"] >= load_checkpoint(last)["global_step"] >= 2
    assert (
        interrupted["optimizer_states"] and interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    )
    assert f"resume with ckpt_path={run_dir / 'checkpoints' / 'interrupted.ckpt'}" in output


# ----------------------------------------------------------------------------------- safe loading
class RunsCode:
    """Unpickling this calls ``fn(*args)``: what a malicious checkpoint would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_checkpoints(tmp_path) -> dict[Path, Path]:
    """Two booby-trapped files (zip as torch.save writes, and a raw pickle) -> the file each would create."""
    made = {}
    shell_marker = tmp_path / "pwned_by_system"
    zip_ckpt = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": RunsCode(os.system, f"touch {shell_marker}")}, zip_ckpt)
    made[zip_ckpt] = shell_marker
    open_marker = tmp_path / "pwned_by_open"
    raw_ckpt = tmp_path / "evil_raw.ckpt"
    raw_ckpt.write_bytes(pickle.dumps({"state_dict": RunsCode(open, str(open_marker), "w")}))
    made[raw_ckpt] = open_marker
    return made


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    for ckpt, marker in evil_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError, match="not a readable pixel-models checkpoint"):
            load_module(ckpt)
        with pytest.raises(CheckpointError, match="not a readable pixel-models checkpoint"):
            run_train(make_cfg(tmp_path / "eval", "train=false", f"ckpt_path={ckpt}"))
        assert not marker.exists()


def test_command_line_evaluation_of_a_checkpoint_carrying_code_fails_clearly(tmp_path):
    ckpt, marker = next(iter(evil_checkpoints(tmp_path).items()))
    result = run_script(
        "train.py",
        "train=false",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=180,
        check=False,
    )
    assert result.returncode != 0
    assert f"{ckpt} is not a readable pixel-models checkpoint" in result.stderr
    assert "weights_only" in result.stderr
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    run_train(make_cfg(tmp_path / "run", "debug=fast", "callbacks.sample_grid=null"))
    whole = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="not a readable pixel-models checkpoint"):
        load_module(truncated)
    with pytest.raises(CheckpointError, match="truncated"):
        run_train(make_cfg(tmp_path / "eval", "train=false", f"ckpt_path={truncated}"))
    with pytest.raises(CheckpointError, match="truncated"):
        run_train(make_cfg(tmp_path / "resume", "debug=fast", f"ckpt_path={truncated}"))
