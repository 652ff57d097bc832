"""Train (and evaluate) an autoregressive image model.

    python train.py                                   # PixelCNN on the bundled digits, offline
    python train.py model=diag_bilstm data=binarized_mnist data.data_dir=../shared/data
    python train.py -m model=pixelcnn,row_lstm,diag_bilstm          # one job (and directory) each
    python train.py trainer=gpu compile=true          # one GPU, bf16 mixed precision, torch.compile
    python train.py trainer=ddp                       # every GPU of this machine, one process each
    python train.py trainer=ddp_sim                   # 2 CPU processes (gloo): DDP without GPUs
    python train.py ckpt_path=<file.ckpt>             # resume exactly where that checkpoint stopped
    python train.py train=false ckpt_path=<file.ckpt> # NLL of a checkpoint on the whole val/test split
    python train.py -m hparams_search=optuna          # Optuna search (pip install -e .[optuna])
    python train.py -m hydra/launcher=submitit_slurm trainer=ddp ...   # on SLURM (pip install -e .[slurm])

Returns the value of ``optimized_metric`` (best validation NLL) so Hydra sweepers can minimise it, and
writes every final metric to ``<run dir>/metrics.json``.
"""

import json
import logging
import math
import os
import signal
import uuid
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from pixel_models.callbacks import StoreDataConfig
from pixel_models.checkpoint import load_checkpoint, load_module
from pixel_models.faults import AtomicCheckpointIO, FaultHandling
from pixel_models.module import AutoregressiveModule
from pixel_models.resumable import ResumableTrainOrder
from pixel_models.sampling import generate, levels_grid, uniform_noise
from pixel_models.tracking import LogConfig, finish_wandb, wandb_offline

log = logging.getLogger("train")

# conf/hydra/launcher/submitit_slurm.yaml completes (and so replaces) the plugin's config of the same name;
# Hydra still checks it against the plugin's schema, and warns that it does.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema"
)

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
ARCHITECTURE_KEYS = ("net", "num_channels", "num_levels", "image_size")


def build(node: DictConfig, **kwargs):
    """``instantiate``, but a constructor's own error (a clear one-line message) reaches the user as is."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def instantiate_all(group: DictConfig | None) -> list:
    return [build(item) for item in (group or {}).values() if item is not None]


def write_samples(ckpt_path: str, num_samples: int, output: Path, seed: int) -> None:
    module = load_module(ckpt_path)
    size = module.image_size
    noise = uniform_noise(num_samples, module.num_channels, size, size, seed)
    save_image(levels_grid(generate(module.net, noise, module.num_levels), module.num_levels), output)
    log.info(f"samples written to {output}")


# --------------------------------------------------------------------------------------------- launching
def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def refuse_relaunching_ddp(trainer: L.Trainer, multirun: bool) -> None:
    """Plain ``ddp`` starts its other processes by re-running the command line: in a multirun that would be
    the whole sweep again, once per process. Refused unless a cluster (SLURM, torchrun) started them."""
    launcher = trainer.strategy.launcher
    if not (multirun and isinstance(launcher, _SubprocessScriptLauncher)):
        return
    if launcher.cluster_environment.creates_processes_externally:
        return
    if launcher.num_processes * launcher.num_nodes <= 1:
        return
    raise RuntimeError(
        "trainer.strategy=ddp starts its other processes by re-running this command, which in a multirun "
        "(-m) would re-run the whole sweep in every process. For a sweep, either submit it to SLURM, where "
        "SLURM starts one process per GPU (-m hydra/launcher=submitit_slurm trainer=ddp "
        "hydra.launcher.gpus_per_node=<N>), or start the processes by spawning: trainer.strategy=ddp_spawn."
    )


# ------------------------------------------------------------------------------------------------- W&B
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


# ------------------------------------------------------------------------------------------ checkpoints
def module_from_checkpoint(ckpt: dict) -> AutoregressiveModule:
    module = AutoregressiveModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


def check_resume_matches(model: AutoregressiveModule, ckpt: dict, ckpt_path: str) -> None:
    saved = ckpt["hyper_parameters"]
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != model.hparams[key]:
            raise ValueError(
                f"{ckpt_path} was trained with model {key}={saved[key]}, the config gives "
                f"{model.hparams[key]}: resume with the model settings it was trained with (or evaluate it "
                f"with train=false)"
            )
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(
            f"{ckpt_path} holds weights only, no training state to resume from: evaluate it with train=false"
        )


def check_data_matches(model: AutoregressiveModule, datamodule, ckpt: dict | None) -> None:
    for key in ("num_channels", "num_levels", "image_size"):
        expected, actual = getattr(model, key), getattr(datamodule, key, None)
        if actual is not None and expected != actual:
            trained_on = (ckpt or {}).get("data_config", {}).get("_target_")
            hint = f" (it was trained on {trained_on}: pick that data config)" if trained_on else ""
            raise ValueError(f"the model has {key}={expected} but the data gives {key}={actual}{hint}")


def best_score(checkpointing) -> float | None:
    """The best monitored value; read back from the best checkpoint where a spawned process found it."""
    if checkpointing is None:
        return None
    if checkpointing.best_model_score is not None:
        return float(checkpointing.best_model_score)
    if checkpointing.best_model_path and os.path.isfile(checkpointing.best_model_path):
        states = load_checkpoint(checkpointing.best_model_path).get("callbacks", {})
        for key, state in states.items():
            if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
                return float(state["best_model_score"])
    return None


# ---------------------------------------------------------------------------------------------- report
def report(metrics: dict, output_dir: str | None, extra: dict) -> None:
    for stage, name in (("val", "validation"), ("test", "test")):
        if f"{stage}/nll" in metrics:
            count = metrics.get(f"{stage}/num_images")
            over = f" over {int(count)} images" if count is not None else ""
            log.info(
                f"{name} NLL: {metrics[f'{stage}/nll']:.6f} nats/image = "
                f"{metrics.get(f'{stage}/bpd', float('nan')):.6f} bits/dim{over}"
            )
    for name in sorted(metrics):
        log.info(f"{name} = {metrics[name]:.6g}")
    if output_dir:
        path = Path(output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        path.write_text(json.dumps({**clean, **extra}, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------- train
def train(cfg: DictConfig, extra_callbacks: list | tuple = ()) -> float | None:
    # A checkpoint is read first, with weights_only=True: a bad file fails here, clearly, having run nothing.
    ckpt = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    if not cfg.train and ckpt is None:
        raise ValueError("train=false evaluates a checkpoint: pass ckpt_path=<file.ckpt>")

    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    if cfg.train:
        model = build(cfg.model)
        if ckpt is not None:
            check_resume_matches(model, ckpt, cfg.ckpt_path)
    else:
        model = module_from_checkpoint(ckpt)  # the checkpoint's own architecture, whatever cfg.model says
    check_data_matches(model, datamodule, ckpt)
    if cfg.get("compile"):
        # In place: parameter names (hence checkpoints) stay those of the plain network.
        model.net.compile(**({} if cfg.compile is True else {"mode": cfg.compile}))

    faults = FaultHandling()
    callbacks = [
        *instantiate_all(cfg.get("callbacks")),
        StoreDataConfig(cfg.data),
        LogConfig(run_config(cfg)),
        ResumableTrainOrder(cfg.seed),
        faults,
        *extra_callbacks,
    ]
    wandb_mode_before = os.environ.get("WANDB_MODE")
    loggers = make_loggers(cfg.get("logger"))
    exit_code = 1
    try:
        trainer = build(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
        )
        refuse_relaunching_ddp(trainer, in_multirun())
        result = run_stages(cfg, trainer, model, datamodule, ckpt)
        exit_code = 0
        return result
    except SIGTERMException:
        name = faults.signal_name or "SIGTERM"
        exit_code = 128 + int(getattr(signal, name, signal.SIGTERM))
        where = faults.interrupted_path
        log.warning(f"training stopped by {name}" + (f"; resume with ckpt_path={where}" if where else ""))
        raise SystemExit(exit_code) from None
    finally:
        finish_wandb(loggers, exit_code)
        # WandbLogger(offline=True) sets WANDB_MODE for the whole process: undo that for the next job.
        if wandb_mode_before is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode_before
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_stages(cfg: DictConfig, trainer: L.Trainer, model, datamodule, ckpt: dict | None) -> float | None:
    checkpointing = trainer.checkpoint_callback
    metrics: dict[str, float] = {}
    best = cfg.ckpt_path
    if cfg.train:
        # weights_only=True: Lightning reads the resumed checkpoint without unpickling code.
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if checkpointing is not None:
            best = checkpointing.best_model_path or checkpointing.last_model_path or None
            if trainer.is_global_zero:
                log.info(f"best checkpoint: {best}")
            score = best_score(checkpointing)
            if score is not None:
                metrics[checkpointing.monitor] = score
    else:
        if trainer.is_global_zero:
            log.info(
                f"evaluating {cfg.ckpt_path} (trained {ckpt.get('global_step', '?')} steps) on whole splits"
            )
        trainer.validate(model, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if cfg.test:
        if not datamodule.has_test_split():
            log.warning("this dataset has no test split available: skipping test (set test=false to silence)")
        else:
            try:
                if cfg.train:
                    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
                else:
                    trainer.test(model, datamodule=datamodule)
            except Exception:
                log.error(f"the test stage failed; the checkpoint is kept at {best}")
                raise
            metrics.update(
                {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            )

    # Exact (float64) split results where this process computed them; logged metrics are float32.
    for stage, result in getattr(model, "split_results", {}).items():
        if stage == "test" or not cfg.train:  # in training, val/nll is the best epoch's (the checkpoint's)
            metrics.update({f"{stage}/{k}": float(v) for k, v in result.items()})

    if cfg.final_samples and best and trainer.is_global_zero:
        write_samples(best, cfg.final_samples, Path(cfg.output_dir) / "samples.png", cfg.seed)

    if trainer.is_global_zero:
        report(
            metrics,
            cfg.get("output_dir"),
            {
                "checkpoint": best,
                # (a ddp_spawn parent never trains itself: its own count stays 0)
                "global_step": (trainer.global_step or None) if cfg.train else ckpt.get("global_step"),
                "world_size": trainer.world_size,
            },
        )
    return metrics.get(cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
