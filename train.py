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

import logging
import os
import signal
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from torchvision.utils import save_image

from pixel_models.sampling.generate import sample_grid
from pixel_models.training.builders import build, build_all
from pixel_models.training.callbacks import StoreDataConfig
from pixel_models.training.checkpoint import (
    best_score,
    check_data_matches,
    check_resume_matches,
    load_checkpoint,
    load_module,
    module_from_checkpoint,
)
from pixel_models.training.faults import AtomicCheckpointIO, FaultHandling
from pixel_models.training.launching import in_multirun, refuse_relaunching_ddp
from pixel_models.training.reporting import report
from pixel_models.training.resumable import ResumableTrainOrder
from pixel_models.training.tracking import (
    LogConfig,
    finish_wandb,
    make_loggers,
    restore_wandb_mode,
    run_config,
)

log = logging.getLogger("train")

# conf/hydra/launcher/submitit_slurm.yaml completes (and so replaces) the plugin's config of the same name;
# Hydra still checks it against the plugin's schema, and warns that it does.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema"
)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


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
        *build_all(cfg.get("callbacks")),
        StoreDataConfig(cfg.data),
        LogConfig(run_config(cfg), cfg.get("output_dir")),
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
        restore_wandb_mode(wandb_mode_before)
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
        final = load_module(best)
        _, grid = sample_grid(
            final.net, cfg.final_samples, final.num_channels, final.image_size, final.num_levels, cfg.seed
        )
        save_image(grid, Path(cfg.output_dir) / "samples.png")
        log.info(f"samples written to {Path(cfg.output_dir) / 'samples.png'}")

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


if __name__ == "__main__":
    main()
