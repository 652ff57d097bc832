"""Every user error is one clear line naming the key or file, before any work starts; no lost work."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ONE_THREAD, ROOT, TINY_RUN, compose_train, run_script
from hydra import compose, initialize_config_dir

from pixel_models.cli import USER_ERROR_EXIT, user_errors
from pixel_models.training.checkpoint import CheckpointError


def train_cfg(out, *overrides):
    return compose_train(f"output_dir={out}", *TINY_RUN, "test=false", *overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.optimizer.lr=abc", r"model.optimizer.lr must be a number, got 'abc'"),
        ("model.optimizer.lr=-1", r"model.optimizer.lr must be a finite number in \(0, 1000\], got -1"),
        ("model.optimizer.lr=nan", r"model.optimizer.lr must be a finite number"),
        ("model.optimizer.weight_decay=inf", r"model.optimizer.weight_decay must be a finite number"),
        ("model.net.hidden=0", r"model.net.hidden must be an integer in \[1, 4096\], got 0"),
        ("model.net.num_layers=-1", r"model.net.num_layers must be an integer in \[0, 256\], got -1"),
        ("model.net.hidden=60000", r"model.net.hidden must be an integer in \[1, 4096\], got 60000"),
        ("model.net.residual=1", r"model.net.residual must be a bool, got 1"),
        ("model.net.arch=resnet", r"model.net.arch: unknown architecture 'resnet'; choose one of"),
        ("final_samples=-1", r"final_samples must be an integer in \[0, 1024\]"),
        ("final_samples=many", r"final_samples must be an integer"),
        ("seed=abc", r"seed must be an integer"),
        ("reuse_freed_memory=1", r"reuse_freed_memory must be true or false, got 1"),
    ],
)
def test_bad_training_settings_fail_before_anything_runs(tmp_path, override, message):
    from train import train

    with pytest.raises(ValueError, match=message):
        train(train_cfg(tmp_path, override))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, cuda, mps, message",
    [
        (
            ["trainer=gpu"],
            False,
            False,
            r"^trainer.accelerator=gpu \(trainer=gpu and trainer=ddp set it\) needs",
        ),
        (["trainer=ddp"], False, False, r"needs a CUDA GPU, .*; train on the CPU with trainer=cpu"),
        (["trainer.accelerator=cuda"], False, True, r"^trainer.accelerator=cuda .* needs a CUDA GPU"),
        (["trainer.accelerator=mps"], True, False, r"^trainer.accelerator=mps needs Apple's MPS"),
        (["trainer.accelerator=tpu"], True, True, r"^trainer.accelerator='tpu' is not supported; choose one"),
        (["trainer.accelerator=3"], True, True, r"^trainer.accelerator=3 is not supported"),
    ],
)
def test_an_accelerator_this_machine_lacks_is_refused_before_anything_is_read(
    tmp_path, monkeypatch, overrides, cuda, mps, message
):
    import train as train_script

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(train_script, "build", lambda *a, **k: pytest.fail("built before the check"))
    # a checkpoint that does not exist: the accelerator is refused before the checkpoint is even read
    cfg = train_cfg(tmp_path, *overrides, f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ValueError, match=message):
        train_script.train(cfg)


@pytest.mark.parametrize(
    "accelerator, cuda, mps",
    [("gpu", True, False), ("gpu", False, True), ("cuda", True, False), ("cpu", False, False)],
)
def test_an_accelerator_this_machine_has_passes_the_check(monkeypatch, accelerator, cuda, mps):
    from train import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    check_accelerator(accelerator)  # no error


def test_a_network_too_big_to_build_is_refused_before_allocating(tmp_path):
    from train import train

    with pytest.raises(ValueError, match="model.net would have .* parameters, more than the 1,000,000,000"):
        train(train_cfg(tmp_path, "model.net.hidden=4096", "model.net.num_layers=64"))


def test_a_failure_of_the_final_samples_keeps_metrics_json_and_the_checkpoint(tmp_path, monkeypatch, caplog):
    import train as train_script

    def broken(*args, **kwargs):
        raise RuntimeError("sampler exploded")

    monkeypatch.setattr(train_script, "sample_grid", broken)
    returned = train_script.train(train_cfg(tmp_path, "final_samples=4", "debug=fast"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert returned == metrics["val/nll"] and Path(metrics["checkpoint"]).is_file()
    assert "final samples failed (RuntimeError: sampler exploded); metrics.json and" in caplog.text


# ------------------------------------------------------------------------------------- sample.py
def sample_cfg(ckpt, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="sample", overrides=[f"ckpt_path={ckpt}", *overrides])


def bad_sample_settings(tmp_path):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder.png").mkdir()
    cases = [
        ("temperature=hot", "temperature must be a finite number above 0"),
        ("temperature=nan", "temperature must be a finite number above 0"),
        ("temperature=0", "temperature must be a finite number above 0"),
        ("batch_size=0", "batch_size must be a positive integer"),
        ("num_samples=-3", "num_samples must be a positive integer"),
        (f"output={tmp_path / 'grid.txt'}", r"output=.*grid.txt must end in .png"),
        (f"output={tmp_path / 'a_folder.png'}", "is a folder; give a file name"),
        (f"save_levels={tmp_path / 'levels.csv'}", r"save_levels=.* must end in .pt or .npz"),
        (f"save_levels={tmp_path / 'a_file' / 'levels.pt'}", "a_file is a file, not a folder"),
        ("mode=complete image=missing.png", "image file not found: missing.png"),
        ("mode=complete split=holdout", "unknown split 'holdout'"),
        ("reuse_freed_memory=maybe", "reuse_freed_memory must be true or false, got 'maybe'"),
    ]
    if not torch.cuda.is_available():
        cases.append(("device=cuda", "device=cuda, but no CUDA GPU is available here"))
    if Path("/proc/self").is_dir():  # a folder no file can be made in, whatever access() says (root)
        cases.append(
            ("output=/proc/grid.png", r"output=/proc/grid.png: (folder /proc is not writable|cannot write)")
        )
    return cases


def test_bad_sampling_settings_fail_before_the_checkpoint_is_even_read(tmp_path):
    from sample import sample

    # The checkpoint does not exist: an error about it would mean the settings were checked too late.
    for overrides, message in bad_sample_settings(tmp_path):
        with pytest.raises(ValueError, match=message):
            sample(
                sample_cfg(tmp_path / "missing.ckpt", f"output={tmp_path / 'out.png'}", *overrides.split())
            )
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        sample(sample_cfg(tmp_path / "missing.ckpt", f"output={tmp_path / 'out.png'}"))
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------ the one-line wrapper
def test_user_errors_are_one_line_and_exit_code_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    for error in (
        ValueError("bad value\nsecond line"),
        CheckpointError("x.ckpt is corrupt"),
        OSError("disk"),
    ):
        with pytest.raises(SystemExit) as stopped, user_errors():
            raise error
        assert stopped.value.code == USER_ERROR_EXIT
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    with pytest.raises(ZeroDivisionError), user_errors():  # a bug is not a user error: its traceback stays
        raise ZeroDivisionError("a bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError), user_errors():
        raise ValueError("shown with its traceback")


@pytest.mark.slow  # a Python start-up (~20 s on a busy machine); the others: test_checkpoint_safety
def test_command_line_setting_errors_are_one_line(tmp_path):
    result = run_script(
        "sample.py",
        f"ckpt_path={tmp_path / 'x.ckpt'}",
        "temperature=hot",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=180,
        check=False,
    )
    assert result.returncode == USER_ERROR_EXIT
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: temperature must be a finite number")


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (
            "train",
            ["modle=pixelcnn"],
            r"^modle=pixelcnn: no setting 'modle' at the top level; did you mean model\?$",
        ),
        (
            "train",
            ["model=pixelcn"],
            r"^model=pixelcn: no such option in conf/model/; choose one of diag_bilstm, .*row_lstm; "
            r"did you mean pixelcnn\?$",
        ),
        (
            "train",
            ["model=row_lstm", "model.net.hiden=8"],
            r"^model.net.hiden=8: no setting 'hiden' under 'model.net'; did you mean model.net.hidden\?$",
        ),
        ("train", ["trainer=gpus"], r"^trainer=gpus: no such option in conf/trainer/; .*did you mean gpu\?$"),
        ("sample", ["checkpoint=x.ckpt"], r"^checkpoint=x.ckpt: no setting 'checkpoint' .* ckpt_path, "),
        ("sample", ["temperature=[1"], r"^cannot read the override: "),
    ],
)
def test_unknown_keys_and_options_on_the_command_line_are_one_line(config, overrides, message):
    from pixel_models.cli import override_error

    found = override_error(ROOT / "conf", config, overrides)
    assert found is not None and "\n" not in found
    assert re.search(message, found), found


def test_overrides_that_compose_are_left_to_hydra():
    from pixel_models.cli import override_error

    for overrides in (["model=diag_bilstm", "model.net.hidden=8", "hydra.run.dir=/tmp/x"], ["+extra=1"], []):
        assert override_error(ROOT / "conf", "train", overrides) is None


def test_a_run_directory_that_cannot_be_made_is_one_line_before_hydra_makes_it(tmp_path):
    from pixel_models.cli import override_error

    (tmp_path / "a_file").write_text("")
    message = override_error(ROOT / "conf", "train", [f"hydra.run.dir={tmp_path}/a_file/run"])
    assert message == (
        f"hydra.run.dir={tmp_path}/a_file/run: {tmp_path}/a_file is a file, not a folder; "
        "pass hydra.run.dir=<a folder you can write to>"
    )
    if Path("/proc/self").is_dir():  # no file can be made there, even by root
        message = override_error(ROOT / "conf", "evaluate", ["hydra.run.dir=/proc/run_${now:%H}"])
        assert message.startswith("hydra.run.dir=/proc/run_${now:%H}: cannot write in folder /proc (")
    # the default run directory, under a working directory that can be written
    assert override_error(ROOT / "conf", "train", [f"hydra.run.dir={tmp_path}/new/run_${{now:%H}}"]) is None


def test_train_py_refuses_an_unknown_key_in_one_line_before_starting(tmp_path):
    result = run_script(
        "train.py", "model.net.hiden=8", f"hydra.run.dir={tmp_path / 'run'}", timeout=180, check=False
    )
    assert result.returncode == USER_ERROR_EXIT
    assert result.stderr.strip().splitlines() == [
        "error: model.net.hiden=8: no setting 'hiden' under 'model.net'; did you mean model.net.hidden?"
    ]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ run folders
@pytest.mark.slow  # two whole train.py runs at once
def test_two_runs_started_together_from_one_folder_get_their_own_run_directories(tmp_path):
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *TINY_RUN,
        "test=false",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
    ]
    procs = [
        subprocess.Popen(
            args, cwd=tmp_path, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    runs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
