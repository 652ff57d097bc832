"""Checkpoints are written atomically, never hold diverged weights, survive SIGTERM, and load safely."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ONE_THREAD, ROOT, TINY_RUN, compose_train, run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

import pixel_models.training.faults as faults
from pixel_models.architectures import ARCHITECTURES
from pixel_models.training.checkpoint import (
    DATA_MODULES,
    FORMAT_VERSION,
    CheckpointError,
    data_module_from_checkpoint,
    digest,
    load_checkpoint,
    load_module,
    stored_data_config,
    with_digest,
)
from pixel_models.training.faults import AtomicCheckpointIO, NonFiniteError
from pixel_models.training.module import AutoregressiveModule


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
    assert result.returncode == 2  # a user error: one line, no traceback
    assert "Traceback" not in result.stderr + result.stdout
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {ckpt} is not a readable pixel-models checkpoint")
    assert "weights_only" in last_line
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


# ------------------------------------------------------------------------- crafted checkpoints (issue 8)
@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    """A checkpoint as train.py writes it (digest, data_config by name), from a few steps on digits."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("real")
    run_train(make_cfg(out, "debug=fast", "final_samples=0"))
    return out / "checkpoints" / "last.ckpt"


def craft(real_ckpt, path, edit, digest=True) -> Path:
    """``real_ckpt`` changed by ``edit(ckpt)``, saved with a valid digest (anyone can compute one)."""
    ckpt = torch.load(real_ckpt, weights_only=True)
    del ckpt["pixel_models"]
    edit(ckpt)
    torch.save(with_digest(ckpt) if digest else ckpt, path)
    return path


def sample_cfg(ckpt, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="sample",
            overrides=[f"ckpt_path={ckpt}", f"output={tmp_path / 'grid.png'}", "num_samples=1", *overrides],
        )


def every_reader(ckpt, tmp_path):
    """Every path that reads a checkpoint, as a callable each."""
    from sample import sample

    return {
        "load_module": lambda: load_module(ckpt),
        "sample generate": lambda: sample(sample_cfg(ckpt, tmp_path)),
        **{
            f"sample complete {split}": lambda split=split: sample(
                sample_cfg(ckpt, tmp_path, "mode=complete", f"split={split}", "num_images=1")
            )
            for split in ("train", "val", "test")
        },
        "train=false": lambda: run_train(make_cfg(tmp_path / "eval", "train=false", f"ckpt_path={ckpt}")),
        "resume": lambda: run_train(make_cfg(tmp_path / "resume", "debug=fast", f"ckpt_path={ckpt}")),
    }


def set_net(**values):
    return lambda ckpt: ckpt["hyper_parameters"]["net"].update(values)


CRAFTED_NETWORKS = {
    "huge hidden (28.8 GB)": (set_net(hidden=60000), r"hidden must be an integer in \[1, 4096\]"),
    "too many parameters": (set_net(hidden=4096, num_layers=64), "parameters, more than"),
    "unknown architecture": (
        set_net(arch="os.system"),
        "net.arch: unknown architecture 'os.system'; choose one of",
    ),
    "bool for int": (set_net(hidden=True), "net.hidden must be an int, got True"),
    "string for int": (set_net(num_layers="7"), "net.num_layers must be an int, got '7'"),
    "negative layers": (set_net(num_layers=-1), r"num_layers must be an integer in \[0, 256\]"),
    "nested value": (set_net(hidden={"_target_": "os.system"}), "must be a number, a string or a bool"),
    "target at the top": (
        lambda c: c["hyper_parameters"].update(_target_="builtins.exec"),
        "not settings this model takes",
    ),
    "channels": (
        lambda c: c["hyper_parameters"].update(num_channels=2),
        "num_channels must be 1 .grey. or 3",
    ),
    "nan lr": (lambda c: c["hyper_parameters"]["optimizer"].update(lr=float("nan")), "optimizer.lr must be"),
    "weights of another shape": (
        lambda c: c["state_dict"].update({next(iter(c["state_dict"])): torch.zeros(1)}),
        "its weights do not fit its hyper_parameters",
    ),
}


EVERY_READER = ("huge hidden (28.8 GB)", "unknown architecture", "weights of another shape")


@pytest.mark.parametrize("crafted", CRAFTED_NETWORKS, ids=list(CRAFTED_NETWORKS))
def test_a_crafted_network_config_is_refused_before_allocating(real_ckpt, tmp_path, crafted):
    """Every reader goes through the same check; three cases run through all of them."""
    edit, message = CRAFTED_NETWORKS[crafted]
    ckpt = craft(real_ckpt, tmp_path / "crafted.ckpt", edit)
    readers = every_reader(ckpt, tmp_path)
    for name, read in (
        readers.items() if crafted in EVERY_READER else [("load_module", readers["load_module"])]
    ):
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=message):
            read()
        assert time.monotonic() - start < 30, name  # refused, not allocated (28.8 GB would take minutes)
        assert not (tmp_path / "grid.png").exists(), name


def runs_code_marker(tmp_path):
    return tmp_path / "pwned"


CRAFTED_DATA = {
    "any callable as _target_": (
        lambda m: {"_target_": "pathlib.Path.touch", "self": str(m)},
        "not one of the project's data modules",
    ),
    "unknown name": (lambda m: {"name": "os", "batch_size": 4}, "names data module 'os'"),
    "target nested in a value": (
        lambda m: {"name": "digits", "batch_size": {"_target_": "pathlib.Path.touch", "self": str(m)}},
        "batch_size must be int, got dict",
    ),
    "target nested in a list": (
        lambda m: {"name": "digits", "num_workers": [{"_target_": "pathlib.Path.touch"}]},
        "num_workers must be int, got list",
    ),
    "unknown key": (lambda m: {"name": "digits", "_target_": "os.system"}, "not a setting of data module"),
    "bool for int": (lambda m: {"name": "digits", "batch_size": True}, "batch_size must be int, got bool"),
    "string for int": (lambda m: {"name": "digits", "batch_size": "64"}, "batch_size must be int, got str"),
    "huge int": (lambda m: {"name": "digits", "batch_size": 10**12}, "out of range"),
    "not a mapping": (lambda m: ["digits"], "is not a mapping"),
}


@pytest.mark.parametrize("crafted", CRAFTED_DATA, ids=list(CRAFTED_DATA))
def test_a_crafted_data_config_is_refused_and_never_instantiated(real_ckpt, tmp_path, crafted):
    from sample import sample

    make, message = CRAFTED_DATA[crafted]
    marker = runs_code_marker(tmp_path)
    ckpt = craft(real_ckpt, tmp_path / "crafted.ckpt", lambda c: c.update(data_config=make(marker)))
    for split in ("train", "val", "test"):
        with pytest.raises(CheckpointError, match=message):
            sample(sample_cfg(ckpt, tmp_path, "mode=complete", f"split={split}"))
    assert not marker.exists() and not (tmp_path / "grid.png").exists()


def test_data_configs_are_stored_by_name_and_every_option_maps_onto_a_project_data_module(tmp_path):
    ckpt = torch.load(tmp_path_ckpt := craft_real(tmp_path), weights_only=True)
    digits = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "digits.yaml"))
    assert ckpt["data_config"] == {"name": "digits", **{k: v for k, v in digits.items() if k != "_target_"}}
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)).save(images / f"{i}.png")
    needs = {"image_folder": {"path": str(images)}}  # a required setting the option leaves null
    for option in sorted((ROOT / "conf" / "data").glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(option)) | needs.get(option.stem, {})
        stored = stored_data_config(config)
        assert stored is not None and stored["name"] == option.stem, f"add {option.stem} to DATA_MODULES"
        built = data_module_from_checkpoint(stored, str(tmp_path_ckpt))
        assert type(built) is DATA_MODULES[option.stem]
        # checkpoints written before names were stored (their _target_ a known class) still load
        assert type(data_module_from_checkpoint(config, str(tmp_path_ckpt))) is DATA_MODULES[option.stem]


def craft_real(tmp_path):
    run_train(make_cfg(tmp_path / "run", "trainer.max_steps=1", "trainer.limit_val_batches=1"))
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_a_checkpoint_carries_a_digest_and_a_flipped_weight_bit_is_reported_as_corrupt(real_ckpt, tmp_path):
    ckpt = torch.load(real_ckpt, weights_only=True)
    assert ckpt["pixel_models"] == {"format": FORMAT_VERSION, "digest": digest(ckpt)}
    data = bytearray(real_ckpt.read_bytes())
    weight = next(t for t in ckpt["state_dict"].values() if t.numel() >= 16)
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10  # one bit of one weight: torch.load still reads the file
    flipped = tmp_path / "flipped.ckpt"
    flipped.write_bytes(bytes(data))
    torch.load(flipped, weights_only=True)
    with pytest.raises(CheckpointError, match=r"flipped.ckpt is corrupt \(its digest does not match\)"):
        load_module(flipped)
    # a checkpoint written before digests existed loads, with a warning naming its format
    old = craft(real_ckpt, tmp_path / "old.ckpt", lambda c: None, digest=False)
    load_module(old)
    newer = craft(real_ckpt, tmp_path / "newer.ckpt", lambda c: None)
    stamped = torch.load(newer, weights_only=True)
    stamped["pixel_models"]["format"] = FORMAT_VERSION + 1
    torch.save(stamped, newer)
    with pytest.raises(CheckpointError, match="has checkpoint format 3, newer than"):
        load_module(newer)


def test_a_resume_state_naming_a_crafted_best_checkpoint_is_refused(real_ckpt, tmp_path):
    evil = craft(real_ckpt, tmp_path / "evil_best.ckpt", set_net(hidden=60000))

    def name_evil_best(ckpt):
        states = [state for state in ckpt["callbacks"].values() if "best_model_path" in state]
        assert states, "no checkpoint callback state in the checkpoint"
        for state in states:
            state["best_model_path"] = str(evil)

    resume = craft(real_ckpt, tmp_path / "resume.ckpt", name_evil_best)
    cfg = make_cfg(tmp_path / "run", "debug=fast", "trainer.max_epochs=2", f"ckpt_path={resume}")
    with pytest.raises(
        CheckpointError, match="the best checkpoint that .* names is refused: .*hidden must be"
    ):
        run_train(cfg)


# ----------------------------------------------------------------------------------------- fuzzing
def assert_clear_or_intact(path, original):
    """Loading ``path`` either fails with one clear line naming it, or gives exactly ``original``."""
    start = time.monotonic()
    try:
        module = load_module(path)
    except CheckpointError as err:
        message = str(err)
        assert str(path) in message and "\n" not in message, message
    else:
        assert module.state_dict().keys() == original.keys()
        assert all(torch.equal(module.state_dict()[k], v) for k, v in original.items())
    assert time.monotonic() - start < 20, "loading took too long"


def test_fuzzed_checkpoints_give_only_clear_errors(real_ckpt, tmp_path):
    whole = real_ckpt.read_bytes()
    original = torch.load(real_ckpt, weights_only=True)["state_dict"]
    rng = random.Random(8)
    target = tmp_path / "fuzzed.ckpt"
    cases = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (0, 1, 4, 100, 5000)]
    cases += [b"PK\x03\x04" + bytes(rng.getrandbits(8) for _ in range(3000))]  # a zip header, then noise
    cases += [
        whole[:n] for n in sorted({*range(0, 64, 7), *rng.sample(range(len(whole)), 40), len(whole) - 1})
    ]
    for _ in range(60):
        flipped = bytearray(whole)
        flipped[rng.randrange(len(whole))] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    for case in cases:
        target.write_bytes(case)
        assert_clear_or_intact(target, original)


def test_command_line_bad_checkpoints_are_one_line_errors(real_ckpt, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(real_ckpt.read_bytes()[:1000])
    result = run_script(
        "sample.py", f"ckpt_path={truncated}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120, check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {truncated} is not a readable")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("conditional", [False, True])
def test_every_architecture_can_be_sized_on_the_meta_device(arch, conditional):
    """Checkpoints are sized on the meta device before anything is allocated: every network must build there
    (no tensor values read while building) with the shapes of the real one."""
    from test_contract import ARCHITECTURE_SETTINGS  # each architecture's small test network

    net = {"arch": arch, **ARCHITECTURE_SETTINGS[arch]["net"]}
    hp = {
        "net": net,
        "num_channels": 3,
        "num_levels": 5,
        "image_size": net.get("image_size", 4),
        "conditional": conditional,
        "num_classes": 3 if conditional else 0,
    }
    real = {k: v.shape for k, v in AutoregressiveModule(**hp).state_dict().items()}
    with torch.device("meta"):
        meta = {k: v.shape for k, v in AutoregressiveModule(**hp).state_dict().items()}
    assert meta == real
