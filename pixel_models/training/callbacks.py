"""Lightning callbacks used by train.py."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from pixel_models.sampling.generate import check_method, sample_grid


class StoreDataConfig(L.Callback):
    """Writes the data module's config (plain values) into every checkpoint as ``data_config``.

    sample.py uses it to load images of the same dataset for completion, without pickled objects.
    """

    def __init__(self, data_config: DictConfig | dict):
        if isinstance(data_config, DictConfig):
            data_config = OmegaConf.to_container(data_config, resolve=True)
        self.data_config = data_config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["data_config"] = self.data_config


class SampleGrid(L.Callback):
    """Every ``every_n_epochs`` training epochs, samples ``num_samples`` images and logs them as a grid.

    The same noise (``seed``) every time, so the grids of successive epochs show the model improving on
    the same draws. Sampling uses the module's network in eval mode (train mode is restored after), the
    cached sampler, and only the global-zero process.

    Where the grid goes: a WandbLogger gets it as ``samples`` (a uint8 HWC array: W&B shows float
    images black), a TensorBoardLogger as image ``samples``; with neither (CSV only, or no logger) it is
    written to ``<trainer.default_root_dir>/samples/epoch_XXX.png`` (XXX: the 0-based epoch, as in the
    checkpoint names).
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 16,
        temperature: float = 1.0,
        seed: int = 0,
        method: str = "cached",
    ):
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError(
                f"sample_grid: every_n_epochs ({every_n_epochs}) and num_samples ({num_samples}) must be "
                f"at least 1; set callbacks.sample_grid=null to turn it off"
            )
        check_method(method)
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.temperature = temperature
        self.seed = seed
        self.method = method

    def sample(self, pl_module) -> torch.Tensor:
        """The grid (3, H', W'), float in [0, 1], sampled with the module in eval mode."""
        _, grid = sample_grid(
            pl_module.net,
            self.num_samples,
            pl_module.num_channels,
            pl_module.image_size,
            pl_module.num_levels,
            self.seed,
            self.temperature,
            self.method,
            pl_module.device,
        )
        return grid

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        grid = self.sample(pl_module)
        uint8_hwc = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        shown = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[uint8_hwc], step=trainer.global_step)
                shown = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", uint8_hwc, trainer.global_step, dataformats="HWC")
                shown = True
        if not shown:
            path = Path(trainer.default_root_dir) / "samples" / f"epoch_{epoch:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(grid, path)
