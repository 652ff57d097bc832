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

Returns the value of ``optimized_metric`` (the best checkpoint's validation NLL) so Hydra sweepers can
minimise it, and writes every final metric to ``<run dir>/metrics.json``, each saying whose it is:
``val/*``, ``best/*`` and ``test/*`` belong to the best checkpoint (``best/checkpoint``, ``best/epoch``),
``last/*`` to the last validation and the last epoch's training batches.
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
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from pixel_models.cli import check_overrides, user_errors
from pixel_models.sampling.generate import sample_grid
from pixel_models.training.allocator import reuse_freed_memory
from pixel_models.training.builders import build, build_all
from pixel_models.training.callbacks import StoreDataConfig
from pixel_models.training.checkpoint import (
    best_score,
    check_checkpoint_module,
    check_data_matches,
    check_model_settings,
    check_network_size,
    check_resume_matches,
    load_checkpoint,
    load_module,
    module_from_checkpoint,
    stored_val_result,
)
from pixel_models.training.faults import AtomicCheckpointIO, FaultHandling
from pixel_models.training.launching import in_multirun, refuse_relaunching_ddp
from pixel_models.training.reporting import report
from pixel_models.training.resumable import ResumableTrainOrder
from pixel_models.training.resuming import ResumeState
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
    refuse_conditional_without_labels(cfg)
    with user_errors():
        return train(cfg)


def check_settings(cfg: DictConfig) -> None:
    """Every setting checked before anything is built or read: one clear error naming the key."""
    for key in ("train", "test", "reuse_freed_memory"):
        if type(cfg[key]) is not bool:
            raise ValueError(f"{key} must be true or false, got {cfg[key]!r}")
    if type(cfg.final_samples) is not int or not 0 <= cfg.final_samples <= 1024:
        raise ValueError(
            f"final_samples must be an integer in [0, 1024] (0: none), got {cfg.final_samples!r}"
        )
    if type(cfg.seed) is not int:
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    check_accelerator(cfg.trainer.get("accelerator", "auto"))
    if cfg.train:
        settings = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k[0] != "_"}
        check_model_settings(settings, "model.")
        check_network_size(settings, "model.")


# Lightning's accelerator names this project runs on ("gpu": CUDA, or Apple's MPS where that is all).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(accelerator) -> None:
    """``trainer.accelerator`` is one this project runs on and this machine has. Lightning finds out only
    once the model and data are built, and then names neither the setting nor the fix."""
    if accelerator not in ACCELERATORS:
        raise ValueError(
            f"trainer.accelerator={accelerator!r} is not supported; choose one of {', '.join(ACCELERATORS)} "
            "(trainer=cpu|gpu|ddp|ddp_sim set it)"
        )
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if (accelerator == "cuda" or accelerator == "gpu" and not mps) and not cuda:
        raise ValueError(
            f"trainer.accelerator={accelerator} (trainer=gpu and trainer=ddp set it) needs a CUDA GPU, "
            "and torch sees none here; train on the CPU with trainer=cpu (trainer=ddp_sim: DDP over CPU "
            "processes)"
        )
    if accelerator == "mps" and not mps:
        raise ValueError(
            "trainer.accelerator=mps needs Apple's MPS, which torch does not see here; use trainer=cpu"
        )


def refuse_conditional_without_labels(cfg: DictConfig) -> None:
    """One line, before anything is built or read: a conditional model needs data with classes (the
    module raises the same in-process; here the user gets no traceback)."""
    if cfg.train and cfg.model.get("conditional") and not cfg.model.get("num_classes"):
        raise SystemExit(
            "error: model.conditional=true needs data with classes, and this data has none (num_classes=0; "
            "binarized MNIST's files hold no labels): pick data with labels or set model.conditional=false"
        )


def train(cfg: DictConfig, extra_callbacks: list | tuple = ()) -> float | None:
    check_settings(cfg)
    # A checkpoint is read first, with weights_only=True: a bad file fails here, clearly, having run nothing.
    ckpt = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path is not None else None
    if not cfg.train and ckpt is None:
        raise ValueError("train=false evaluates a checkpoint: pass ckpt_path=<file.ckpt>")

    if cfg.reuse_freed_memory:
        log.info(f"memory: {reuse_freed_memory()}")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.train:
        if ckpt is not None:
            check_checkpoint_module(ckpt, cfg.ckpt_path)  # its settings and weights, as for evaluation
        model = build(cfg.model)
        if ckpt is not None:
            check_resume_matches(model, ckpt, cfg.ckpt_path)
    else:
        # the checkpoint's own architecture, whatever cfg.model says
        model = module_from_checkpoint(ckpt, cfg.ckpt_path)
    datamodule = build(cfg.data)
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
        ResumeState(),
        faults,
        *extra_callbacks,
    ]
    wandb_mode_before = os.environ.get("WANDB_MODE")
    loggers = make_loggers(cfg.get("logger"))
    exit_code = 1
    trainer = None
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
        # Stopped after training (in the test stage): the last checkpoint resumes what is left.
        last = getattr(trainer.checkpoint_callback, "last_model_path", None) if trainer is not None else None
        where = faults.interrupted_path or last
        log.warning(f"training stopped by {name}" + (f"; resume with ckpt_path={where}" if where else ""))
        raise SystemExit(exit_code) from None
    finally:
        finish_wandb(loggers, exit_code)
        restore_wandb_mode(wandb_mode_before)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_stages(cfg: DictConfig, trainer: L.Trainer, model, datamodule, ckpt: dict | None) -> float | None:
    metrics: dict = {"params": sum(p.numel() for p in model.parameters())}
    best = cfg.ckpt_path
    if cfg.train:
        # weights_only=True: Lightning reads the resumed checkpoint without unpickling code.
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        best, fitted = fit_results(trainer, model, datamodule)
        metrics.update(fitted)
    else:
        if trainer.is_global_zero:
            log.info(
                f"evaluating {cfg.ckpt_path} (trained {ckpt.get('global_step', '?')} steps) on whole splits"
            )
        trainer.validate(model, datamodule=datamodule)
        metrics.update(split_metrics(trainer, model, "val"))
        metrics.update(checkpoint=cfg.ckpt_path, epoch=ckpt.get("epoch"), global_step=ckpt.get("global_step"))

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
            metrics.update(split_metrics(trainer, model, "test"))
            if cfg.train:  # the test result is the best checkpoint's
                metrics.update(
                    {f"test/{k}": metrics.get(f"best/{k}") for k in ("checkpoint", "epoch", "global_step")}
                )

    if trainer.is_global_zero:
        report(metrics, cfg.get("output_dir"), {"world_size": trainer.world_size})
    # After metrics.json: a failure here loses neither it nor a checkpoint.
    if cfg.final_samples and best and trainer.is_global_zero:
        try:
            write_final_samples(cfg, best)
        except Exception as err:  # noqa: BLE001 - reported; the run's results are already written
            log.error(f"final samples failed ({type(err).__name__}: {err}); metrics.json and {best} are kept")
    if cfg.optimized_metric not in metrics and trainer.is_global_zero:
        log.warning(f"optimized_metric={cfg.optimized_metric} was not measured: this run returns None")
    return metrics.get(cfg.optimized_metric)


def write_final_samples(cfg: DictConfig, best: str) -> None:
    final = load_module(best)
    facts = (final.num_channels, final.image_size, final.num_levels, cfg.seed)
    grid = sample_grid(final.net, cfg.final_samples, *facts)[-1]  # a conditional model: one row per class
    save_image(grid, Path(cfg.output_dir) / "samples.png")
    log.info(f"samples written to {Path(cfg.output_dir) / 'samples.png'}")


def split_metrics(trainer: L.Trainer, model, stage: str) -> dict:
    """``<stage>/nll``, ``/bpd``, ``/num_images``: exact (float64) where this process computed them, else
    the logged (float32) values (a ddp_spawn parent only gets those back)."""
    result = getattr(model, "split_results", {}).get(stage)
    if result is None:
        result = {
            k: float(trainer.callback_metrics[f"{stage}/{k}"])
            for k in ("nll", "bpd", "num_images")
            if f"{stage}/{k}" in trainer.callback_metrics
        }
    return {f"{stage}/{k}": result[k] for k in ("nll", "bpd", "num_images", "nll_per_class") if k in result}


def fit_results(trainer: L.Trainer, model, datamodule) -> tuple[str | None, dict]:
    """After fit: the best checkpoint's path and metrics that say which weights each belongs to.

    ``best/*`` and the unprefixed ``val/*`` (what sweeps optimise): the best checkpoint's exact validation
    result, read back from its file, where the module stored it at validation time (re-evaluated when the
    file holds none for its own step); ``last/*``: the last validation of the run and the mean training
    NLL of its last epoch; ``global_step`` and ``epochs``: how far training went.
    """
    checkpointing = trainer.checkpoint_callback
    last_val = dict(getattr(model, "split_results", {}).get("val") or {})
    last_path = (checkpointing.last_model_path or None) if checkpointing is not None else None
    if not last_val and last_path and os.path.isfile(last_path):  # a ddp_spawn parent fitted nothing itself
        last_val = stored_val_result(load_checkpoint(last_path)) or {}
    metrics: dict = {
        "global_step": trainer.global_step or None,  # (a ddp_spawn parent never trains itself: 0)
        "epochs": trainer.current_epoch,  # completed
    }

    best = None
    if checkpointing is not None:
        best = checkpointing.best_model_path or checkpointing.last_model_path or None
    if best is None:  # no checkpoints: the weights in memory are the result
        best_val = last_val or None
    else:
        if trainer.is_global_zero:
            log.info(f"best checkpoint: {best}")
        best_ckpt = load_checkpoint(best)
        best_val = stored_val_result(best_ckpt)
        if best_val is None:
            trainer.validate(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            result = getattr(model, "split_results", {}).get("val")
            if result is not None:
                best_val = {
                    **result,
                    "epoch": best_ckpt.get("epoch"),
                    "global_step": best_ckpt.get("global_step"),
                }
    metrics["checkpoint"] = metrics["best/checkpoint"] = best
    if best_val:
        metrics.update({"best/epoch": best_val.get("epoch"), "best/global_step": best_val.get("global_step")})
        for k in ("nll", "bpd", "num_images", "nll_per_class"):
            if k in best_val:  # nll_per_class: data with classes only
                metrics[f"best/val/{k}"] = metrics[f"val/{k}"] = best_val[k]
    else:
        score = best_score(checkpointing)  # float32, as monitored; no bits/dim to pair it with
        if score is not None:
            metrics[checkpointing.monitor] = score

    # last.ckpt is named only when it holds the last validation's weights (LastAndBestCheckpoint writes it
    # after every validation; Lightning's own ModelCheckpoint only together with a new best).
    last_ckpt = load_checkpoint(last_path) if last_path and os.path.isfile(last_path) else None
    if last_ckpt is not None and last_val and last_ckpt.get("global_step") == last_val.get("global_step"):
        metrics["last/checkpoint"] = last_path
    else:
        metrics["last/checkpoint"] = None
    if last_val:
        metrics.update({"last/epoch": last_val.get("epoch"), "last/global_step": last_val.get("global_step")})
        metrics.update(
            {
                f"last/val/{k}": last_val[k]
                for k in ("nll", "bpd", "num_images", "nll_per_class")
                if k in last_val
            }
        )
    if "train/nll_epoch" in trainer.callback_metrics:
        metrics["last/train/nll"] = float(trainer.callback_metrics["train/nll_epoch"])
    return best, metrics


if __name__ == "__main__":
    check_overrides(__file__, "train")
    main()
