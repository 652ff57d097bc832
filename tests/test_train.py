"""train.py end to end on the offline data, and its errors for bad input."""

import pytest
import torch
from helpers import ROOT, compose_train, run_script
from hydra.errors import MissingConfigException

from pixel_models.training.checkpoint import CheckpointError, load_checkpoint, load_module
from pixel_models.training.likelihood import nll_per_image

MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
OFFLINE_DATA = ["digits"]
# A narrow network of each model: its width setting (PixelCNN++ has filters, not h).
NARROW = {"pixelcnn_pp": "model.net.num_filters=8"}


def make_cfg(tmp_path, *overrides):
    return compose_train(
        f"output_dir={tmp_path}", "trainer.accelerator=cpu", "callbacks.progress_bar=null", *overrides
    )


def run_train(cfg):
    from train import train

    return train(cfg)


@pytest.mark.parametrize("data", OFFLINE_DATA)
@pytest.mark.parametrize("model", MODELS)
def test_fast_run_trains_checkpoints_and_samples(tmp_path, model, data):
    metric = run_train(
        make_cfg(
            tmp_path, f"model={model}", f"data={data}", "debug=fast", NARROW.get(model, "model.net.hidden=8")
        )
    )
    assert metric is not None and 0 < metric < 1e4
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "samples.png").is_file()
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # weights_only=True inside
    assert ckpt["data_config"]["name"] == "digits"  # a conf/data option, never a _target_


def test_validation_nll_is_exact_over_the_whole_split(tmp_path):
    # batch 64 over 300 validation images leaves a last batch of 44: a mean of batch means would differ.
    metric = run_train(
        make_cfg(
            tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "final_samples=0", "test=false"
        )
    )
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    from datamodules.digits import DigitsDataModule

    data = DigitsDataModule(batch_size=64, num_workers=0, num_channels=1, num_levels=17, image_size=8)
    data.setup("validate")
    levels = data.splits["val"]
    with torch.no_grad():
        expected = nll_per_image(module(levels.float() / 16), levels).double().mean()
    assert metric == pytest.approx(float(expected), rel=1e-5)


def test_command_line_train_then_sample(tmp_path):
    run_dir = tmp_path / "run"
    run_script("train.py", "debug=fast", f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "samples.png").is_file()
    out = tmp_path / "grid.png"
    run_script(
        "sample.py",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "num_samples=4",
        f"output={out}",
        f"hydra.run.dir={tmp_path / 'sample'}",
    )
    assert out.is_file()


def test_unknown_config_value_is_a_clear_error(tmp_path):
    with pytest.raises(MissingConfigException, match="model/no_such_model"):
        make_cfg(tmp_path, "model=no_such_model")
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        run_train(make_cfg(tmp_path, "model.net.arch=nope", "debug=fast"))
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_train(make_cfg(tmp_path, "model.optimizer.name=sgdx", "debug=fast"))


def test_image_size_and_channel_mismatch_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        run_train(make_cfg(tmp_path, "debug=fast", "model.image_size=16"))
    with pytest.raises(ValueError, match="num_channels"):
        run_train(make_cfg(tmp_path, "debug=fast", "data.num_channels=3"))


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_module(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_module(bad)
    with pytest.raises(ValueError, match="ckpt_path"):
        run_train(make_cfg(tmp_path, "train=false"))


def test_trainer_configs_compose(tmp_path):
    def trainer(*overrides):
        return compose_train(f"output_dir={tmp_path}", *overrides).trainer

    for name, expected in (
        ("cpu", ("cpu", "auto", 1, "32-true")),
        ("gpu", ("gpu", "auto", 1, "bf16-mixed")),
        ("ddp", ("gpu", "ddp", "auto", "bf16-mixed")),  # outside SLURM: every visible GPU
        ("ddp_sim", ("cpu", "ddp", 2, "32-true")),
    ):
        t = trainer(f"trainer={name}")
        assert (t.accelerator, t.strategy, t.devices, t.precision) == expected, name
    clip = trainer("trainer.gradient_clip_val=1.0")
    assert (clip.gradient_clip_val, clip.gradient_clip_algorithm) == (1.0, "norm")


def test_compile_keeps_checkpoints_loadable(tmp_path, monkeypatch):
    # compile=true compiles the network in place; the `eager` backend keeps this test fast and compiler-free
    # (test_compile_with_inductor, marked slow, uses the real one).
    compiled = []
    original = torch.nn.Module.compile

    def compile_eagerly(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return original(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    run_train(make_cfg(tmp_path, "debug=fast", "compile=true", "final_samples=0", "test=false"))
    assert compiled == ["PixelCNN"]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert not any("_orig_mod" in name for name in ckpt["state_dict"])


@pytest.mark.slow
def test_compile_with_inductor(tmp_path):
    """About 2 minutes on a CPU: inductor compiles C++ kernels."""
    run_dir = tmp_path / "run"
    run_script(
        "train.py",
        "debug=fast",
        "compile=true",
        "trainer=cpu",
        "final_samples=0",
        "test=false",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
        timeout=900,
    )
    assert load_module(run_dir / "checkpoints" / "last.ckpt")  # plain parameter names
