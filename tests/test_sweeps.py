"""Sweeps: a directory per job, the Optuna sweeper, the SLURM launcher config, no `ddp` in a -m sweep."""

import importlib.util
import json
import os

import pytest
import yaml
from helpers import compose_train, run_script
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from pixel_models.training.checkpoint import load_checkpoint

QUIET = ["callbacks.progress_bar=null", "+trainer.enable_progress_bar=false", "final_samples=0", "test=false"]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def train_py(*args, timeout=300):
    return run_script("train.py", *args, *QUIET, timeout=timeout)


def test_multirun_gives_each_job_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    train_py("-m", "debug=fast", "model.net.hidden=4,8", f"hydra.sweep.dir={sweep}")
    for job, hidden in (("0", 4), ("1", 8)):
        ckpt = load_checkpoint(sweep / job / "checkpoints" / "last.ckpt")
        assert ckpt["hyper_parameters"]["net"]["hidden"] == hidden
        assert json.loads((sweep / job / "metrics.json").read_text())["val/nll"] > 0
        assert f"model.net.hidden={hidden}" in yaml.safe_load(
            (sweep / job / ".hydra" / "overrides.yaml").read_text()
        )
    # the results table reads the same folders: one row per job, the model and data its config chose
    from pixel_models.results import collect

    rows, problems = collect([sweep])
    assert [(r["run"], r["model"], r["data"]) for r in rows] == [
        ("0", "pixelcnn", "digits"),
        ("1", "pixelcnn", "digits"),
    ]
    assert (
        rows[1]["val_nll"] == json.loads((sweep / "1" / "metrics.json").read_text())["val/nll"]
        and not problems
    )


@pytest.mark.skipif(
    not has("hydra_plugins.hydra_optuna_sweeper"),
    reason="Hydra's Optuna sweeper is not installed: pip install -e .[optuna]",
)
def test_optuna_search_minimises_the_returned_validation_nll(tmp_path):
    sweep = tmp_path / "optuna"
    train_py("hparams_search=optuna", "debug=fast", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"model.optimizer.lr", "model.net.hidden"}
    trials = [json.loads((sweep / job / "metrics.json").read_text())["val/nll"] for job in ("0", "1")]
    assert results["best_value"] == pytest.approx(min(trials), rel=1e-6)


def test_plain_ddp_in_a_multirun_is_refused(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    cfg = compose_train(f"output_dir={tmp_path}", "trainer=ddp_sim", "debug=fast", *QUIET, hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    from train import train

    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(RuntimeError, match=r"re-run the whole sweep.*submitit_slurm.*ddp_spawn"):
            train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert not (tmp_path / "checkpoints").exists()  # refused before training


def test_ddp_under_slurm_takes_its_processes_from_slurm(tmp_path, monkeypatch):
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from train import build, refuse_relaunching_ddp

    # what SLURM sets in each task of `sbatch --nodes=1 --ntasks-per-node=2` (here: task 0)
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": "node1",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    # trainer=ddp reads devices and num_nodes from SLURM's environment (on CPUs here, to build it anywhere)
    cfg = compose_train(
        f"output_dir={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32"
    )
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.strategy) == (2, 1, "ddp")
    trainer: L.Trainer = build(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy.launcher.cluster_environment.creates_processes_externally  # nothing is spawned
    refuse_relaunching_ddp(trainer, multirun=True)  # allowed: SLURM started the processes


@pytest.mark.skipif(
    not has("hydra_plugins.hydra_submitit_launcher"),
    reason="Hydra's submitit launcher is not installed: pip install -e .[slurm]",
)
def test_submitit_slurm_launcher_asks_one_task_per_gpu(tmp_path, monkeypatch):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_train(
        f"output_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/launcher=submitit_slurm",
        "trainer=ddp",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.nodes=2",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=720",
        hydra_config=True,
    )
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg.tasks_per_node, launcher_cfg.gpus_per_node, launcher_cfg.nodes) == (4, 4, 2)
    assert (launcher_cfg.partition, launcher_cfg.timeout_min) == ("gpu", 720)

    HydraConfig.instance().set_config(cfg)
    try:
        launcher = instantiate(launcher_cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert type(launcher).__name__ == "SlurmLauncher"

    # The job script submitit would submit (a stand-in `srun` lets it build one off a cluster): every key of
    # our config must be one submitit knows, mapped as the launcher maps it.
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    params.pop("max_num_timeout")
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    script = _make_sbatch_string(command="python -u train.py", folder=folder, **executor._executor.parameters)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=720"):
        assert f"#SBATCH {line}\n" in script, line
