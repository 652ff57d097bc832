"""Lightning callbacks used by train.py: data config in checkpoints, sample and completion grids, the
training signals people watch (learning rate, gradient norm, throughput, epoch time, peak GPU memory) and
the console model summary."""

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichModelSummary
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import grad_norm
from lightning.pytorch.utilities.model_summary import summarize
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from pixel_models.sampling.generate import check_method, generate, sample_grid, uniform_noise
from pixel_models.training.checkpoint import stored_data_config

log = logging.getLogger(__name__)


class LastAndBestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best checkpoints by ``monitor``), with ``last.ckpt`` rewritten at
    every save point, whether or not the monitored value improved.

    Lightning 2.6 writes ``last.ckpt`` only in a step that also writes a top-k checkpoint: once validation
    NLL stops improving, ``last.ckpt`` stays a copy of the best, and resuming from it would silently go back
    to that step. Here it follows the training: written after every validation (or every training epoch,
    where this callback saves at epoch ends).
    """

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer) -> None:
        # skipped where the parent already saved at this step (then last.ckpt was written with it)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class StoreDataConfig(L.Callback):
    """Writes which data config was used into every checkpoint as ``data_config``: ``{"name": <the
    conf/data option>, <its plain settings>}``, never a ``_target_``.

    sample.py uses it to load images of the same dataset for completion: the name is mapped onto the
    project's own data modules (``checkpoint.DATA_MODULES``) and the settings checked, nothing instantiated
    as written. A data module that is not one of the project's is not stored (completion then needs
    ``image=``).
    """

    def __init__(self, data_config: DictConfig | dict):
        if isinstance(data_config, DictConfig):
            data_config = OmegaConf.to_container(data_config, resolve=True)
        self.data_config = stored_data_config(data_config)
        if self.data_config is None:
            log.warning(
                f"data module {data_config.get('_target_')} is not one of the project's: checkpoints will "
                f"not name it, so sample.py mode=complete needs image=<file>"
            )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.data_config is not None:
            checkpoint["data_config"] = dict(self.data_config)


class SampleGrid(L.Callback):
    """Every ``every_n_epochs`` training epochs, samples ``num_samples`` images and logs them as a grid.

    The same noise (``seed``) every time, so the grids of successive epochs show the model improving on
    the same draws. Sampling uses the module's network in eval mode (train mode is restored after), the
    cached sampler, and only the global-zero process. A conditional model's grid has one row per class
    (the same noise in every row).

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
        """The grid (3, H', W'), float in [0, 1], sampled with the module in eval mode; for a conditional
        model one row per class (``sample_grid``: at least ``num_samples`` images in all)."""
        return sample_grid(
            pl_module.net,
            self.num_samples,
            pl_module.num_channels,
            pl_module.image_size,
            pl_module.num_levels,
            self.seed,
            self.temperature,
            self.method,
            pl_module.device,
        )[-1]

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        classes = getattr(pl_module.net, "num_classes", 0)
        caption = f"one row per class, 0..{classes - 1}" if classes else None
        show_image(trainer, "samples", self.sample(pl_module), epoch, caption)


def show_image(
    trainer: L.Trainer, key: str, grid: torch.Tensor, epoch: int, caption: str | None = None
) -> None:
    """A grid (3, H, W), float in [0, 1], to every W&B and TensorBoard logger as image ``key`` (W&B gets
    uint8: it shows float images black; and the ``caption``); with neither, to
    ``<default_root_dir>/<key>/epoch_XXX.png``."""
    uint8_hwc = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    shown = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {} if caption is None else {"caption": [caption]}
            logger.log_image(key=key, images=[uint8_hwc], step=trainer.global_step, **extra)
            shown = True
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, uint8_hwc, trainer.global_step, dataformats="HWC")
            shown = True
    if not shown:
        path = Path(trainer.default_root_dir) / key / f"epoch_{epoch:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)


def completion_grid(
    net: torch.nn.Module,
    images: torch.Tensor,
    num_levels: int,
    completions_per_image: int,
    seed: int,
    temperature: float = 1.0,
    method: str = "cached",
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Completions of the bottom halves of ``images`` (N, C, H, W) given their top halves: a grid (3, H', W')
    with one row per image: original | top half (the unknown half grey) | ``completions_per_image``
    completions. The network is put in eval mode (its mode is restored after); the noise is fixed by
    ``seed``, so successive epochs complete with the same draws. ``label``: (N,) the images' classes, for
    a conditional network (None: unconditional)."""
    num, channels, height, width = images.shape
    device = next(net.parameters()).device
    known_mask = torch.zeros(num * completions_per_image, channels, height, width, dtype=torch.bool)
    known_mask[:, :, : height // 2] = True
    known = images.repeat_interleave(completions_per_image, 0)
    noise = uniform_noise(num * completions_per_image, channels, height, width, seed)
    was_training = net.training
    net.eval()
    try:
        completed = generate(
            net,
            noise.to(device),
            num_levels,
            temperature,
            method,
            known=known.to(device),
            known_mask=known_mask.to(device),
            label=None if label is None else label.repeat_interleave(completions_per_image).to(device),
        ).cpu()
    finally:
        net.train(was_training)
    scale = num_levels - 1
    originals = images.float() / scale
    top_half = originals.clone()
    top_half[:, :, height // 2 :] = 0.5
    rows = torch.cat(
        [
            originals[:, None],
            top_half[:, None],
            completed.float().div(scale).view(num, completions_per_image, channels, height, width),
        ],
        dim=1,
    )
    return make_grid(rows.flatten(0, 1), nrow=2 + completions_per_image, padding=2, pad_value=1.0)


class CompletionGrid(L.Callback):
    """Every ``every_n_epochs`` training epochs, completes the bottom halves of the first ``num_images``
    validation images given their top halves (``completion_grid``) and logs the grid as ``completions``
    (W&B / TensorBoard image, else ``<run dir>/completions/epoch_XXX.png``). Skipped for data without a
    validation split. A conditional model completes each image given its own class. Global-zero process
    only."""

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 8,
        completions_per_image: int = 3,
        temperature: float = 1.0,
        seed: int = 0,
        method: str = "cached",
    ):
        if every_n_epochs < 1 or num_images < 1 or completions_per_image < 1:
            raise ValueError(
                f"completion_grid: every_n_epochs ({every_n_epochs}), num_images ({num_images}) and "
                f"completions_per_image ({completions_per_image}) must be at least 1; set "
                f"callbacks.completion_grid=null to turn it off"
            )
        check_method(method)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.completions_per_image = completions_per_image
        self.temperature = temperature
        self.seed = seed
        self.method = method
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def validation_images(self, trainer) -> torch.Tensor | None:
        """The first ``num_images`` images of the validation split (integer levels, and their classes when
        the data has them), or None without one: from the data module's ``splits["val"]`` (and
        ``labels["val"]``), else from the validation loader's dataset."""
        if self._images is None:
            count = self.num_images
            datamodule = getattr(trainer, "datamodule", None)
            splits = getattr(datamodule, "splits", None)
            if isinstance(splits, dict) and len(splits.get("val", ())) > 0:
                self._images = splits["val"][:count].clone()
                labels = (getattr(datamodule, "labels", None) or {}).get("val")
                self._labels = None if labels is None else labels[:count].clone()
                return self._images
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
            dataset = getattr(loader, "dataset", None)
            if dataset is None or len(dataset) == 0:
                return None
            items = [dataset[i] for i in range(min(count, len(dataset)))]
            self._images = torch.stack([torch.as_tensor(item["levels"]) for item in items])
            if all("label" in item for item in items):
                self._labels = torch.tensor([int(item["label"]) for item in items])
        return self._images

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = self.validation_images(trainer)
        if images is None:
            return
        grid = completion_grid(
            pl_module.net,
            images,
            pl_module.num_levels,
            self.completions_per_image,
            self.seed,
            self.temperature,
            self.method,
            label=self._labels if getattr(pl_module, "conditional", False) else None,
        )
        show_image(trainer, "completions", grid, epoch)


class LearningRate(LearningRateMonitor):
    """Lightning's LearningRateMonitor (keys ``lr-<Optimizer>``, e.g. ``lr-Adam``, every logged step), that
    stays quiet instead of failing when a run has no logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._active = bool(trainer.loggers)
        if self._active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if self._active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if self._active:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class TrainingSignals(L.Callback):
    """What people watch while a model trains, logged through every logger:

    - ``train/grad_norm``: the 2-norm of all gradients together, before clipping (Lightning's ``grad_norm``
      in ``on_before_optimizer_step``, which runs before clipping and after AMP unscaling), at the steps
      Lightning logs (``trainer.log_every_n_steps``);
    - ``train/images_per_sec``: training images per second over the epoch, all processes together,
      validation time excluded;
    - ``train/epoch_time_s``: wall time of the epoch, validation included;
    - ``train/peak_gpu_memory_gb``: peak memory allocated on the GPU during the epoch (on CUDA only).

    Lightning's ThroughputMonitor is not used: it reports only once 100 batches fill its window, and logs
    validation throughput at validation-batch steps, which W&B drops as steps going backwards.
    """

    def __init__(self):
        self._epoch_start = 0.0
        self._train_time = 0.0
        self._mark: float | None = None  # start of the current stretch of training batches
        self._batches_since_mark = 0
        self._images = 0

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # time the work done, not the work queued
        return time.perf_counter()

    def _close_stretch(self, pl_module) -> None:
        if self._mark is not None and self._batches_since_mark:
            self._train_time += self._now(pl_module) - self._mark
        self._mark, self._batches_since_mark = None, 0

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._epoch_start = self._mark = self._now(pl_module)
        self._train_time, self._batches_since_mark, self._images = 0.0, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._images += len(batch["levels"])
        self._batches_since_mark += 1

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._close_stretch(pl_module)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._mark, self._batches_since_mark = self._now(pl_module), 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not getattr(trainer._logger_connector, "should_update_logs", True):
            return
        norms = grad_norm(pl_module, norm_type=2)
        if norms:
            pl_module.log("train/grad_norm", norms["grad_2.0_norm_total"], on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, pl_module):
        self._close_stretch(pl_module)
        epoch_time = self._now(pl_module) - self._epoch_start
        pl_module.log("train/epoch_time_s", epoch_time, on_step=False, on_epoch=True)
        if self._train_time > 0:
            images_per_sec = self._images * trainer.world_size / self._train_time
            pl_module.log("train/images_per_sec", images_per_sec, on_step=False, on_epoch=True)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            pl_module.log("train/peak_gpu_memory_gb", peak, on_step=False, on_epoch=True)


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary, with FLOPs that mean something: counted by torch's FlopCounterMode
    on one example image (zeros of the model's input shape), so ``FLOPs`` is per image and forward pass.
    When they cannot be counted (a compiled network, an operation the counter refuses) the FLOPs column
    and total are left out rather than shown as 0."""

    def on_fit_start(self, trainer, pl_module):
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary, flops_counted = self._summary_with_flops(pl_module)
        data = summary._get_summary_data()
        if not flops_counted:
            data = [column for column in data if column[0] != "FLOPs"]
        print_summary(
            data,
            summary.trainable_parameters,
            summary.total_parameters,
            summary.model_size,
            summary.total_training_modes,
            summary.total_flops if flops_counted else None,
        )

    def _summary_with_flops(self, pl_module):
        net = getattr(pl_module, "net", None)
        compiled = getattr(net, "_compiled_call_impl", None) is not None
        shape = (1, pl_module.num_channels, pl_module.image_size, pl_module.image_size)
        if compiled or pl_module.example_input_array is not None:
            return summarize(pl_module, max_depth=self._max_depth), not compiled
        pl_module.example_input_array = torch.zeros(shape)
        try:
            return summarize(pl_module, max_depth=self._max_depth), True
        except Exception:  # the counter could not run this network: summarise without an example
            pl_module.example_input_array = None
            return summarize(pl_module, max_depth=self._max_depth), False
        finally:
            pl_module.example_input_array = None


def print_summary(data, trainable, total, size_mb, modes, flops: int | None) -> None:
    from rich import get_console
    from rich.table import Table

    table = Table(header_style="bold magenta")
    for name, _ in data:
        table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left", no_wrap=True)
    for row in zip(*(values for _, values in data), strict=True):
        table.add_row(*row)
    console = get_console()
    console.print(table)
    grid = Table.grid(expand=True)
    grid.add_column()
    grid.add_row(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable))}")
    grid.add_row(f"[bold]Non-trainable params[/]: {get_human_readable_count(int(total - trainable))}")
    grid.add_row(f"[bold]Total params[/]: {get_human_readable_count(int(total))}")
    grid.add_row(f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(size_mb)}")
    grid.add_row(f"[bold]Modules in train mode[/]: {modes['train']}")
    grid.add_row(f"[bold]Modules in eval mode[/]: {modes['eval']}")
    if flops is not None:
        grid.add_row(f"[bold]FLOPs per image (forward)[/]: {get_human_readable_count(int(flops))}")
    console.print(grid)
