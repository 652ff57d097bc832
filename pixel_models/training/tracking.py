"""Experiment tracking around the loggers: W&B's online/offline choice, the config as hyperparameters, and
one finished W&B run per job."""

import logging
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pixel_models.training.builders import build

log = logging.getLogger("train")

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"


def wandb_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entries = netrc.netrc(os.environ.get("NETRC") or None)
    except (netrc.NetrcParseError, OSError):
        return False
    auth = entries.authenticators(host) if host else None
    return bool(auth and auth[2])


def wandb_offline(requested: bool | None) -> bool:
    """``logger.wandb.offline``: true / false as given; null (the default): as WANDB_MODE says if it is set,
    else offline unless an API key is configured, so that a run without one never prompts for a key or
    waits on the network."""
    if requested is not None:
        return bool(requested)
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun")
    return not wandb_key_configured()


class LogConfig(L.Callback):
    """Gives every logger the whole resolved run config as hyperparameters, from inside the processes that
    train (a spawned process gets its loggers fresh: touching them in the parent would break them)."""

    def __init__(self, config: dict):
        self.config = config
        self._logged = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._logged:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)
        self._logged = True


def finish_wandb(loggers: list, exit_code: int) -> None:
    """Ends this job's W&B run, so that each job of a sweep has its own, and says how to upload an offline
    run."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._experiment is None:
            continue
        run = logger._experiment
        settings = getattr(run, "settings", None)
        offline = bool(getattr(settings, "_offline", False))
        sync_dir = getattr(settings, "sync_dir", None)
        run.finish(exit_code=exit_code)
        if offline and sync_dir:
            log.info(f"W&B ran offline; upload this run with:  wandb sync {sync_dir}")


def make_loggers(group: DictConfig | None) -> list:
    loggers = []
    for node in (group or {}).values():
        if node is None:
            continue
        if node.get("_target_") == WANDB_TARGET:
            offline = wandb_offline(node.get("offline"))
            online = not offline and os.environ.get("WANDB_MODE") != "disabled"
            log_model = node.get("log_model", False) if online else False  # artifacts need a server
            Path(node.save_dir).mkdir(parents=True, exist_ok=True)
            # A fixed id: processes that start afresh (ddp_spawn's, stage after stage) continue one run.
            run_id = node.get("id") or node.get("version") or uuid.uuid4().hex[:12]
            loggers.append(build(node, offline=offline, log_model=log_model, id=run_id))
        else:
            loggers.append(build(node))
    return loggers


def run_config(cfg: DictConfig) -> dict:
    """The whole resolved config, and which option of each config group was chosen."""
    config = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"  # present when composed with Hydra's own config (tests): not the run's
    }
    if HydraConfig.initialized():
        config["choices"] = dict(HydraConfig.get().runtime.choices)
    return config


def restore_wandb_mode(before: str | None) -> None:
    """WandbLogger(offline=True) sets WANDB_MODE for the whole process: undo that for the next job."""
    if before is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = before
