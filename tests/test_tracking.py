"""Tracking without W&B: run names and groups, the end-of-sweep summary (Optuna importances), the completion
grid, the model summary's FLOPs, and TensorBoard parity (the same scalars and images as W&B)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import GRIDS_EVERY_EPOCH, compose_train
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict
from test_wandb import WATCHED

from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.training.builders import build
from pixel_models.training.tracking import run_name, sweep_group, sweep_summary, swept_keys, wandb_naming


def test_swept_keys_are_the_command_line_sweeps_and_the_sweepers_params():
    overrides = ["model=pixelcnn,row_lstm", "trainer.max_epochs=1", "+x=range(3)", "lr=interval(0.1,1)"]
    keys = swept_keys(overrides, {"model.net.hidden": "choice(8, 16)"})
    assert keys == ["model.net.hidden", "model", "x", "lr"]
    assert swept_keys(["logger=wandb"], None) == []


def test_run_names_keep_what_the_sweep_varies():
    lr = "model.optimizer.lr"
    overrides = ["model=row_lstm", "logger=wandb", f"{lr}=0.000312345678", "trainer.max_epochs=1"]
    assert run_name(overrides, {"model", lr}) == "model=row_lstm model.optimizer.lr=0.0003123"
    # a single run: all its overrides but the logger's and Hydra's
    assert run_name(overrides + ["hydra.run.dir=x"], None) == (
        "model=row_lstm model.optimizer.lr=0.0003123 trainer.max_epochs=1"
    )
    assert run_name(["logger=wandb"], None) is None  # W&B picks a name


@pytest.fixture
def hydra_job(tmp_path):
    """Sets Hydra's config of a job composed from the overrides, as Hydra does when it runs one."""

    def set_job(*overrides, multirun=False):
        cfg = compose_train(f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides, hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN if multirun else RunMode.RUN
            cfg.hydra.overrides.task = list(overrides)
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield set_job
    HydraConfig.instance().cfg = None


def test_wandb_names_groups_and_tags(hydra_job, tmp_path):
    cfg = hydra_job("model=row_lstm", "logger=wandb", "trainer.max_epochs=3")
    naming = wandb_naming(cfg.logger.wandb)
    assert naming["name"] == "model=row_lstm trainer.max_epochs=3" and "group" not in naming
    assert naming["tags"] == ["model:row_lstm", "data:digits"]

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"swept": ["trainer.max_epochs"]}))
    cfg = hydra_job("model=row_lstm", "logger=wandb", "trainer.max_epochs=3", multirun=True)
    naming = wandb_naming(cfg.logger.wandb)
    assert naming["name"] == "trainer.max_epochs=3"
    assert naming["group"] == sweep_group(cfg.hydra.job.name, sweep) == f"{cfg.hydra.job.name}-sweep"

    # the user's own name and group win; their tags are kept
    cfg = hydra_job(
        "logger=wandb",
        "logger.wandb.name=mine",
        "logger.wandb.group=g",
        "logger.wandb.tags=[t]",
        multirun=True,
    )
    naming = wandb_naming(cfg.logger.wandb)
    assert (naming["name"], naming["group"]) == ("mine", "g")
    assert naming["tags"] == ["t", "model:pixelcnn", "data:digits"]


def test_sweep_summary_names_the_best_job_and_optunas_importances(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    cfg = compose_train("hparams_search=optuna", f"hydra.sweep.dir={sweep}", hydra_config=True)
    # six finished trials whose value depends on the learning rate only, and one that failed
    trials = [(1e-4, 8), (3e-4, 16), (1e-3, 32), (3e-3, 64), (5e-3, 8), (8e-3, 32)]
    for job, (lr, hidden) in enumerate(trials + [(2e-3, 16)]):
        job_dir = sweep / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        overrides = [f"model.optimizer.lr={lr}", f"model.net.hidden={hidden}"]
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if job < len(trials):
            (job_dir / "metrics.json").write_text(json.dumps({"val/nll": 100.0 + 1e4 * lr}))
    summary = sweep_summary(cfg, sweep)
    assert (summary["num_jobs"], summary["num_finished"], summary["direction"]) == (7, 6, "minimize")
    assert summary["best"]["job"] == "0" and summary["best"]["value"] == pytest.approx(101.0)
    assert summary["jobs"][6]["value"] is None  # the failed trial is listed, without a value
    importances = summary["param_importances"]
    assert set(importances) == {"model.optimizer.lr", "model.net.hidden"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert importances["model.optimizer.lr"] > importances["model.net.hidden"]


def tiny_module(*overrides):
    cfg = compose_train("model.net.hidden=4", "model.net.num_layers=2", *overrides)
    return build(cfg.model)


@pytest.mark.parametrize("conditional", [False, True])
def test_completion_grid_keeps_the_top_half_and_completes_the_bottom(conditional):
    from pixel_models.training.callbacks import completion_grid

    module = tiny_module(f"model.conditional={conditional}", "++data.num_classes=10")
    k, size = module.num_levels, module.image_size
    images = torch.randint(0, k, (2, 1, size, size))
    label = torch.tensor([3, 7]) if conditional else None
    grid = completion_grid(module.net, images, k, completions_per_image=2, seed=0, label=label)
    assert module.net.training  # its mode is restored

    def tile(row, col):  # make_grid: 2 pixels of padding around every tile
        y, x = 2 + row * (size + 2), 2 + col * (size + 2)
        return grid[0, y : y + size, x : x + size]

    half = size // 2
    for row in range(2):
        original = images[row, 0].float() / (k - 1)
        assert torch.equal(tile(row, 0), original)
        assert torch.equal(tile(row, 1)[:half], original[:half])
        assert torch.all(tile(row, 1)[half:] == 0.5)  # the unknown half, grey
        for col in (2, 3):
            completed = tile(row, col)
            assert torch.equal(completed[:half], original[:half])  # known pixels never change
            levels = completed[half:] * (k - 1)
            assert torch.allclose(levels, levels.round(), atol=1e-4)  # the bottom: sampled levels


class GlobalZero:
    is_global_zero = True


def conv_flops(module, shape) -> int:
    """Multiply-adds of every convolution, as 2 FLOPs each, from the output sizes (PixelCNN is all convs).

    A masked k x k kernel runs with its k // 2 + 1 unmasked rows only, over k // 2 extra output rows
    that are dropped (``MaskedConv2d.forward``): those are the multiply-adds that happen."""
    total = 0

    def count(conv, inputs, output):
        nonlocal total
        kh, kw = conv.kernel_size
        rows, extra = (kh // 2 + 1, kh // 2) if isinstance(conv, MaskedConv2d) else (kh, 0)
        b, c, height, width = output.shape
        total += 2 * b * c * (height + extra) * width * (conv.in_channels // conv.groups) * rows * kw

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        module(torch.zeros(shape))
    for hook in hooks:
        hook.remove()
    return total


def test_model_summary_shows_flops_per_image_or_none(capsys, monkeypatch):
    from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

    from pixel_models.training.callbacks import ModelSummary

    module = tiny_module()
    expected = conv_flops(module, (1, module.num_channels, module.image_size, module.image_size))
    ModelSummary().on_fit_start(GlobalZero(), module)
    out = capsys.readouterr().out
    assert f"FLOPs per image (forward): {get_human_readable_count(expected)}" in out
    assert "FLOPs: 0" not in out and module.example_input_array is None

    def refuse(*args, **kwargs):
        raise RuntimeError("an operation the counter cannot run")

    monkeypatch.setattr(module, "forward", refuse)
    ModelSummary().on_fit_start(GlobalZero(), module)
    out = capsys.readouterr().out
    assert "Total params" in out and "FLOPs" not in out  # left out, not shown as 0


def test_tensorboard_gets_the_same_scalars_and_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train import train

    clip = 1e-3
    cfg = compose_train(
        f"output_dir={tmp_path}",
        "logger=tensorboard",
        "trainer=cpu",
        "debug=fast",
        "test=false",
        "final_samples=0",
        "model.net.hidden=4",
        "trainer.max_epochs=2",
        f"trainer.gradient_clip_val={clip}",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "+trainer.enable_progress_bar=false",
        *GRIDS_EVERY_EPOCH,
    )
    train(cfg)
    events = EventAccumulator(str(Path(tmp_path) / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/nll_step", "val/nll", "val/bpd", *WATCHED} <= scalars
    assert "hp_metric" not in scalars  # no -1 placeholder
    assert [len(events.Images(key)) for key in ("samples", "completions")] == [2, 2]
    # the norm is taken before clipping: far above the clipping threshold for an untrained model
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(norms) == 6 and min(norms) > 100 * clip
    assert (tmp_path / "provenance.json").exists() and (tmp_path / "config_resolved.yaml").exists()
