"""logger=wandb: without an API key it runs offline (no prompt, no network), one run per train() call."""

import logging

import lightning as L
import pytest
from helpers import compose_train


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
        "+trainer.enable_progress_bar=false",
        "final_samples=0",
        "model.net.hidden=8",
        *overrides,
    )


class SeeRun(L.Callback):
    """What the W&B run holds when training ends."""

    def on_train_end(self, trainer, pl_module):
        (logger,) = trainer.loggers
        self.mode = logger.experiment.settings.mode
        self.config = logger.experiment.config.as_dict()


def test_wandb_without_a_key_runs_offline_and_says_how_to_sync(no_wandb_key, caplog):
    import os

    import wandb

    from train import train

    out = no_wandb_key / "run"
    cfg = make_cfg(
        out,
        "logger=wandb",
        "debug=fast",
        "test=false",
        "trainer.max_epochs=2",
        # a sample grid every epoch: SampleGrid logs it through the logger, as a uint8 image
        "+callbacks.sample_grid._target_=pixel_models.training.callbacks.SampleGrid",
        "+callbacks.sample_grid.every_n_epochs=1",
        "+callbacks.sample_grid.num_samples=4",
    )
    seen = SeeRun()
    with caplog.at_level(logging.INFO, logger="train"):
        metric = train(cfg, extra_callbacks=[seen])
    assert metric is not None
    assert seen.mode in ("offline", "dryrun")  # dryrun: W&B's older name for offline
    assert seen.config["model"]["net"]["hidden"] == 8  # the resolved config, all of it
    assert seen.config["data"]["_target_"] == "datamodules.digits.DigitsDataModule"

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run per train() call"
    run_dir = runs[0]
    # what `wandb sync` will upload: W&B's transaction log (config and metrics as JSON) and the media
    (log,) = run_dir.glob("run-*.wandb")
    records = log.read_bytes()
    for fragment in (b'"hidden":8', b"DigitsDataModule", b'"max_epochs":2', b"val/nll", b"train/nll_step"):
        assert fragment in records, fragment
    assert len(list((run_dir / "files" / "media" / "images").glob("samples_*.png"))) == 2  # 2 epochs
    assert f"wandb sync {run_dir}" in caplog.text
    # the run is finished, and WandbLogger's process-wide WANDB_MODE does not leak into the next job
    assert wandb.run is None
    assert "WANDB_MODE" not in os.environ


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
