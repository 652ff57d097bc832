"""logger=wandb, read back from what the offline W&B runs wrote: their transaction logs (``run-*.wandb``, read
with W&B's own reader, ``wandb leet inspect --json``) and media files, not mocks. Without an API key a run
is offline (no prompt, no network); a -m sweep is one group of runs named by their overrides."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from helpers import GRIDS_EVERY_EPOCH, ROOT, compose_train

# What every training run logs, besides the NLLs (see TrainingSignals and LearningRate).
WATCHED = ("lr-Adam", "train/grad_norm", "train/images_per_sec", "train/epoch_time_s")


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No key anywhere W&B looks (env, netrc), no mode chosen, and W&B's own files under tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    return tmp_path


def make_cfg(out, *overrides):
    return compose_train(
        f"output_dir={out}",
        "trainer=cpu",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "+trainer.enable_progress_bar=false",
        "final_samples=0",
        "model.net.hidden=8",
        *overrides,
    )


class OfflineRun:
    """One offline W&B run as its directory holds it: the records of its transaction log, parsed."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        (log_file,) = run_dir.glob("run-*.wandb")
        lines = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]

    def of_type(self, kind: str) -> list[dict]:
        return [r[kind] for r in self.records if r["type"] == kind]

    @property
    def run(self) -> dict:
        return self.of_type("run")[0]

    @property
    def config(self) -> dict:
        merged = {}
        for update in self.of_type("config"):
            merged.update(update.get("update", {}))
        return merged

    @property
    def history(self) -> list[dict]:
        return [h["item"] for h in self.of_type("history")]

    def history_keys(self) -> set[str]:
        return {key for item in self.history for key in item}

    @property
    def summary(self) -> dict:
        merged = {}
        for update in self.of_type("summary"):
            merged.update(update.get("update", {}))
        return merged

    def images(self, key: str) -> list[Path]:
        return sorted((self.dir / "files" / "media" / "images").glob(f"{key}_*.png"))


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    return [OfflineRun(d) for d in sorted(wandb_dir.glob("offline-run-*"))]


def git_head() -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


class SeeRun(L.Callback):
    """What the W&B run holds when training ends."""

    def on_train_end(self, trainer, pl_module):
        (logger,) = trainer.loggers
        self.mode = logger.experiment.settings.mode


def test_wandb_without_a_key_runs_offline_and_records_what_people_watch(no_wandb_key, caplog):
    import wandb

    from train import train

    out = no_wandb_key / "run"
    cfg = make_cfg(
        out,
        "logger=wandb",
        "debug=fast",
        "test=false",
        "trainer.max_epochs=2",
        *GRIDS_EVERY_EPOCH,  # logged through the logger as uint8 images
    )
    seen = SeeRun()
    with caplog.at_level(logging.INFO, logger="train"):
        metric = train(cfg, extra_callbacks=[seen])
    assert metric is not None
    assert seen.mode in ("offline", "dryrun")  # dryrun: W&B's older name for offline

    (run,) = offline_runs(out / "wandb")  # one offline W&B run per train() call
    config = run.config
    assert config["model"]["net"]["hidden"] == 8  # the resolved config, all of it
    assert config["data"]["_target_"] == "datamodules.digits.DigitsDataModule"
    assert config["trainer"]["max_epochs"] == 2
    # the code version and the command line
    code = config["provenance"]["code"]
    assert code["git_commit"] == git_head() and isinstance(code["git_dirty"], bool)
    assert config["provenance"]["command"].startswith("python ")
    # and the same in the run directory
    assert json.loads((out / "provenance.json").read_text())["code"]["git_commit"] == git_head()
    assert "max_epochs: 2" in (out / "config_resolved.yaml").read_text()

    keys = run.history_keys()
    for key in ("train/nll_step", "val/nll", "val/bpd", *WATCHED):
        assert key in keys, key
    assert "train/peak_gpu_memory_gb" not in keys  # CPU: no GPU memory to report
    rates = [h["train/images_per_sec"] for h in run.history if "train/images_per_sec" in h]
    assert len(rates) == 2 and all(r > 0 for r in rates)  # once per epoch
    assert len(run.images("samples")) == 2 and len(run.images("completions")) == 2  # 2 epochs each
    assert f"wandb sync {run.dir}" in caplog.text
    # the run is finished, and WandbLogger's process-wide WANDB_MODE does not leak into the next job
    assert run.of_type("exit")[0].get("exit_code", 0) == 0
    assert wandb.run is None
    assert "WANDB_MODE" not in os.environ


def test_a_sweep_is_one_group_of_runs_named_by_their_overrides(no_wandb_key):
    sweep = no_wandb_key / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "-m",
        "model=pixelcnn,row_lstm",
        "logger=wandb",
        "logger.wandb.tags=[mine]",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "model.net.hidden=4",
        "test=false",
        "final_samples=0",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "+trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    runs = {}
    for job, model in (("0", "pixelcnn"), ("1", "row_lstm")):
        (run,) = offline_runs(sweep / job / "wandb")
        runs[model] = run
        assert run.run["display_name"] == f"model={model}"  # what the sweep varies, nothing else
        assert set(run.run["tags"]) == {"mine", f"model:{model}", "data:digits"}
        assert run.config["provenance"]["code"]["git_commit"] == git_head()
        assert run.config["provenance"]["job_command"].startswith(f"python train.py model={model} ")
        assert set(WATCHED) <= run.history_keys()
    groups = {run.run["run_group"] for run in runs.values()}
    assert groups == {"train-sweep"}  # one group, named after the sweep

    # the end of the sweep: the best job, in the sweep directory and as a W&B run of the same group
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    values = {job: json.loads((sweep / job / "metrics.json").read_text())["val/nll"] for job in ("0", "1")}
    best_job = min(values, key=values.get)
    assert summary["best"]["job"] == best_job
    assert summary["best"]["value"] == pytest.approx(values[best_job])
    assert [job["name"] for job in summary["jobs"]] == ["model=pixelcnn", "model=row_lstm"]
    (summary_run,) = offline_runs(sweep / "wandb")
    assert summary_run.run["run_group"] == "train-sweep"
    assert summary_run.run["job_type"] == "sweep_summary"
    assert summary_run.summary["best/value"] == pytest.approx(values[best_job])
    assert summary_run.summary["best/job"] == best_job


def test_wandb_mode_follows_the_key_env_and_config(no_wandb_key, monkeypatch):
    from pixel_models.training.tracking import wandb_offline

    assert wandb_offline(None) is True  # no key: offline
    assert wandb_offline(False) is False and wandb_offline(True) is True  # as configured
    netrc_file = no_wandb_key / "no.netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    assert wandb_offline(None) is False  # `wandb login` wrote a key
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_offline(None) is False
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline(None) is True  # an explicit WANDB_MODE wins


def test_checkpoints_go_to_wandb_only_when_online(no_wandb_key, monkeypatch):
    from train import make_loggers

    cfg = make_cfg(no_wandb_key / "run", "logger=wandb")
    (offline,) = make_loggers(cfg.logger)
    assert (offline._offline, offline._log_model) == (True, False)  # no key: no upload attempted
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    (online,) = make_loggers(cfg.logger)  # builds the logger only: nothing is contacted yet
    assert (online._offline, online._log_model) == (False, True)
