"""Train (and evaluate) an autoregressive image model.

    python train.py                                   # PixelCNN on the bundled digits, offline
    python train.py model=diag_bilstm data=binarized_mnist data.data_dir=../shared/data
    python train.py -m model=pixelcnn,row_lstm,diag_bilstm

Returns the value of ``optimized_metric`` (best validation NLL) so Hydra sweepers can minimise it.
"""

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.utils import save_image

from pixel_models.callbacks import StoreDataConfig
from pixel_models.checkpoint import load_module
from pixel_models.sampling import generate

log = logging.getLogger("train")


def build(node: DictConfig, **kwargs):
    """``instantiate``, but a constructor's own error (a clear one-line message) reaches the user unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise (err.__cause__ or err) from None


def instantiate_all(group: DictConfig | None) -> list:
    return [build(item) for item in (group or {}).values() if item is not None]


def write_samples(ckpt_path: str, num_samples: int, output: Path, seed: int) -> None:
    module = load_module(ckpt_path)
    size = module.image_size
    noise = torch.rand(
        num_samples, module.num_channels, size, size, generator=torch.Generator().manual_seed(seed)
    )
    levels = generate(module.net, noise, module.num_levels)
    save_image(levels.float() / (module.num_levels - 1), output, nrow=int(num_samples**0.5 + 0.5))
    log.info(f"samples written to {output}")


def train(cfg: DictConfig) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    model = build(cfg.model)
    callbacks = [*instantiate_all(cfg.get("callbacks")), StoreDataConfig(cfg.data)]
    trainer = build(cfg.trainer, callbacks=callbacks, logger=instantiate_all(cfg.get("logger")) or False)
    checkpointing = trainer.checkpoint_callback

    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    elif cfg.ckpt_path is None:
        raise ValueError("train=false evaluates a checkpoint: pass ckpt_path=<file.ckpt>")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = cfg.ckpt_path
    if cfg.train and checkpointing is not None:
        best = checkpointing.best_model_path or checkpointing.last_model_path or None
        log.info(f"best checkpoint: {best}")
        if checkpointing.best_model_score is not None:
            metrics[checkpointing.monitor] = float(checkpointing.best_model_score)

    if not cfg.train:
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if cfg.test:
        if not datamodule.has_test_split():
            log.warning("this dataset has no test split available: skipping test (set test=false to silence)")
        else:
            try:
                trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            except Exception:
                log.error(f"the test stage failed; the trained checkpoint is kept at {best}")
                raise
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    if cfg.final_samples and best and trainer.is_global_zero:
        write_samples(best, cfg.final_samples, Path(cfg.output_dir) / "samples.png", cfg.seed)

    for name in sorted(metrics):
        log.info(f"{name} = {metrics[name]:.6g}")
    return metrics.get(cfg.optimized_metric)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
