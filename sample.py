"""Sample images from a trained checkpoint into a PNG grid, or complete occluded images (Figure 1).

    python sample.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt num_samples=64
    python sample.py ckpt_path=<file.ckpt> mode=complete                  # top halves of 4 val images
    python sample.py ckpt_path=<file.ckpt> mode=complete image=digit.png mask=left_half

mode=generate: ``num_samples`` images from scratch. mode=complete: images from a split of the
checkpoint's dataset (``split``, ``num_images``; the data module is rebuilt from the checkpoint's
``data_config``, ``data_dir`` overrides where its files are) or one image file (``image``), of which the
``mask`` part is kept (top_half, left_half, or a PNG whose white pixels are known) and the rest
sampled ``completions_per_image`` times. Known pixels are never changed. The grid has one row per
image: original | occluded (unknown pixels as a grey checkerboard) | completions.

Conditional checkpoints (trained with model.conditional=true): ``label=<class>`` makes every sample (or
completion) one of that class; ``label=all`` (mode=generate) a grid with one row per class, the same noise
in every row, at least ``num_samples`` images in all; ``label=null`` samples unconditionally (the
"no label" class, trained by label dropout).

method=cached (default) computes each layer at the new pixel only; method=naive runs the whole network
for every sub-pixel (the reference, H*W*C times slower to much slower). Both give the same images.
"""

import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from rich.progress import Progress
from torchvision.utils import make_grid, save_image

from pixel_models.cli import check_overrides, unwritable_folder, user_errors
from pixel_models.sampling.generate import check_method, class_rows, generate, levels_grid, uniform_noise
from pixel_models.training.allocator import reuse_freed_memory
from pixel_models.training.checkpoint import (
    CheckpointError,
    data_module_from_checkpoint,
    load_checkpoint,
    module_from_checkpoint,
)

log = logging.getLogger("sample")

MODES = ("generate", "complete")
SPLIT_STAGES = {"train": "fit", "val": "validate", "test": "test"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LEVELS_SUFFIXES = (".pt", ".npz")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but no CUDA GPU is available here; use device=cpu (or auto)")
    return torch.device(name)


def check_output_path(key: str, value, suffixes: tuple[str, ...]) -> Path:
    """An output file setting: a known suffix, not a folder, in a folder that exists or can be made and
    that we may write to. Checked before any sampling starts."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a file name ending in {' or '.join(suffixes)}, got {value!r}")
    path = Path(value)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{key}={value} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{key}={value} is a folder; give a file name")
    reason = unwritable_folder(path.parent)
    if reason is not None:
        raise ValueError(f"{key}={value}: {reason}")
    return path


def check_settings(cfg: DictConfig) -> None:
    """Every setting of sample.py, before the checkpoint is read or anything sampled."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; choose generate or complete")
    check_method(cfg.method)
    if type(cfg.reuse_freed_memory) is not bool:
        raise ValueError(f"reuse_freed_memory must be true or false, got {cfg.reuse_freed_memory!r}")
    for key in ("batch_size", "num_samples", "num_images", "completions_per_image"):
        if type(cfg[key]) is not int or not 1 <= cfg[key] <= 1_000_000:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if type(cfg.seed) is not int:
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    temperature = cfg.temperature
    if type(temperature) not in (int, float) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number above 0 (1 = the model's own), got {temperature!r}"
        )
    check_output_path("output", cfg.output, IMAGE_SUFFIXES)
    if cfg.save_levels is not None:
        check_output_path("save_levels", cfg.save_levels, LEVELS_SUFFIXES)
    pick_device(cfg.device)
    if cfg.mode == "complete":
        if cfg.split not in SPLIT_STAGES:
            raise ValueError(f"unknown split {cfg.split!r}; choose train, val or test")
        for key in ("image", "data_dir"):
            if cfg[key] is not None and not isinstance(cfg[key], str):
                raise ValueError(f"{key} must be a path, got {cfg[key]!r}")
        if cfg.image is not None and not Path(cfg.image).is_file():
            raise ValueError(f"image file not found: {cfg.image}")
        mask = cfg.mask
        if not isinstance(mask, str):
            raise ValueError(f"mask must be top_half, left_half or a .png file, got {mask!r}")
        if mask.lower().endswith(".png") and not Path(mask).is_file():
            raise ValueError(f"mask file not found: {mask}")


def save_levels(path: Path, levels: torch.Tensor, **extra: torch.Tensor) -> None:
    """Integer samples to .pt (a tensor; a dict with ``levels`` when there are extras) or .npz (arrays)."""

    def small(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.uint8 if t.max() < 256 else torch.int16) if t.dtype != torch.bool else t

    arrays = {"levels": small(levels), **{name: small(t) for name, t in extra.items()}}
    if path.suffix == ".pt":
        torch.save(arrays if extra else arrays["levels"], path)
    elif path.suffix == ".npz":
        np.savez_compressed(path, **{name: t.numpy() for name, t in arrays.items()})
    else:
        raise ValueError(f"save_levels must end in .pt or .npz, got {path}")


# ----------------------------------------------------------------------------------------------------
# Completion inputs: the images and which of their pixels are known


def checkpoint_datamodule(ckpt: dict, ckpt_path: str, split: str, data_dir: str | None, **overrides):
    """The checkpoint's own data module (from its ``data_config``), set up so that ``split`` is loaded."""
    data_config = ckpt.get("data_config")
    if not data_config:
        raise CheckpointError(
            f"{ckpt_path} holds no data_config (not written by train.py); pass image=<file.png> instead"
        )
    if split not in SPLIT_STAGES:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    # Never instantiated as written: the name maps onto one of our data modules, its values are checked.
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    datamodule = data_module_from_checkpoint(data_config, ckpt_path, **overrides)
    datamodule.prepare_data()  # fetches missing files, as training did, or says where to put them
    if split == "test" and not datamodule.has_test_split():
        raise ValueError("the checkpoint's dataset has no test split here; use split=val")
    datamodule.setup(SPLIT_STAGES[split])
    if split not in datamodule.splits:
        raise ValueError(f"the checkpoint's dataset has no {split} split here")
    return datamodule


def dataset_images(ckpt_path: str, split: str, num_images: int, data_dir: str | None) -> torch.Tensor:
    """The first ``num_images`` images (N, C, H, W) of ``split`` of the checkpoint's own dataset."""
    datamodule = checkpoint_datamodule(load_checkpoint(ckpt_path), ckpt_path, split, data_dir)
    return datamodule.splits[split][:num_images].long()


def file_image(path: str, channels: int, size: int, num_levels: int) -> torch.Tensor:
    """One image file as levels (1, C, H, W) of the model's K: grey or RGB as the model wants."""
    if not Path(path).is_file():
        raise ValueError(f"image file not found: {path}")
    image = _read_image(path, "L" if channels == 1 else "RGB", "image")
    if image.size != (size, size):
        raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; the model takes {size}x{size} images")
    values = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0)
    values = values[None] if channels == 1 else values.permute(2, 0, 1)
    return (values * (num_levels - 1)).round().long()[None]


def _read_image(path: str, mode: str, key: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{key}={path} is not an image file this can read ({type(err).__name__})") from None


def known_pixels(mask: str, size: int) -> torch.Tensor:
    """Bool (H, W), True where a pixel is kept: top_half, left_half, or a PNG (white = known)."""
    known = torch.zeros(size, size, dtype=torch.bool)
    if mask == "top_half":
        known[: size // 2] = True
    elif mask == "left_half":
        known[:, : size // 2] = True
    elif mask.lower().endswith(".png"):
        if not Path(mask).is_file():
            raise ValueError(f"mask file not found: {mask}")
        grey = np.asarray(_read_image(mask, "L", "mask"))
        if grey.shape != (size, size):
            height, width = grey.shape
            raise ValueError(f"mask {mask} is {width}x{height}; the model's images are {size}x{size}")
        known = torch.from_numpy(grey >= 128)
    else:
        raise ValueError(f"unknown mask {mask!r}; choose top_half, left_half or a .png file (white = known)")
    return known


def occluded(images: torch.Tensor, known: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Float images in [0, 1] with the unknown pixels drawn as a grey checkerboard."""
    size = images.shape[-1]
    checker = 0.35 + 0.3 * ((torch.arange(size)[:, None] + torch.arange(size)[None]) % 2)
    return torch.where(known, images.float() / (num_levels - 1), checker)


# ----------------------------------------------------------------------------------------------------
# Sampling


def check_label(label, module, mode: str) -> int | str | None:
    """``label`` validated against the checkpoint: None, a class 0..num_classes-1, or "all" (generate)."""
    if label is None:
        if module.conditional and module.hparams.get("label_dropout", 0.0) == 0.0:
            log.warning(
                "this conditional model was trained without label dropout, so its 'no label' class is "
                "untrained: pass label=<class> or label=all for class-conditional samples"
            )
        return None
    if not module.conditional:
        raise ValueError(
            f"label={label!r}: this checkpoint is unconditional (trained with model.conditional=false); "
            f"drop label= or train with model.conditional=true"
        )
    classes = module.num_classes
    if label == "all":
        if mode != "generate":
            raise ValueError("label=all (one grid row per class) is for mode=generate; give one class")
        return label
    if type(label) is not int or not 0 <= label < classes:
        raise ValueError(f"label must be a class 0..{classes - 1} or 'all', got {label!r}")
    return label


def sample_batches(
    net, noise, num_levels, cfg, device, known=None, known_mask=None, labels=None
) -> torch.Tensor:
    """``generate`` over batches of ``cfg.batch_size``, with a progress bar of rows done; ``labels``: (N,)
    classes of a conditional model's images, or None."""
    size = noise.shape[-2]
    batches = []
    with Progress() as progress:
        num_batches = -(-len(noise) // cfg.batch_size)
        rows = progress.add_task(f"{cfg.method} sampling, rows", total=size * num_batches)
        for start in range(0, len(noise), cfg.batch_size):
            part = slice(start, start + cfg.batch_size)
            batches.append(
                generate(
                    net,
                    noise[part].to(device),
                    num_levels,
                    cfg.temperature,
                    cfg.method,
                    known=None if known is None else known[part],
                    known_mask=None if known_mask is None else known_mask[part],
                    on_row=lambda i: progress.advance(rows),
                    label=None if labels is None else labels[part],
                ).cpu()
            )
    return torch.cat(batches)


def sample(cfg: DictConfig) -> torch.Tensor:
    """Runs sample.py; returns the sampled levels (N, C, H, W) (completions: all of them, image by image)."""
    check_settings(cfg)
    device = pick_device(cfg.device)
    module = module_from_checkpoint(load_checkpoint(cfg.ckpt_path), cfg.ckpt_path).eval()
    label = check_label(cfg.get("label"), module, cfg.mode)
    if cfg.reuse_freed_memory:  # naive sampling's network passes would otherwise fault memory in afresh
        log.info(f"memory: {reuse_freed_memory()}")
    net = module.net.to(device)
    size, channels, num_levels = module.image_size, module.num_channels, module.num_levels
    output = Path(cfg.output)

    if cfg.mode == "generate":
        if label == "all":  # one row per class, the same noise in every row
            labels, per_class = class_rows(module.num_classes, cfg.num_samples)
            noise = uniform_noise(per_class, channels, size, size, cfg.seed)
            noise = noise.repeat(module.num_classes, 1, 1, 1)
        else:
            labels = None if label is None else torch.full((cfg.num_samples,), label, dtype=torch.long)
            noise, per_class = uniform_noise(cfg.num_samples, channels, size, size, cfg.seed), None
        levels = sample_batches(net, noise, num_levels, cfg, device, labels=labels)
        grid = levels_grid(levels, num_levels, nrow=per_class)
        extra = {} if labels is None else {"labels": labels}
    else:
        known = known_pixels(str(cfg.mask), size)  # before loading data: a bad mask fails fast
        if cfg.image is not None:
            images = file_image(cfg.image, channels, size, num_levels)
        else:
            images = dataset_images(cfg.ckpt_path, cfg.split, cfg.num_images, cfg.data_dir)
        per_image = cfg.completions_per_image
        known_mask = known.expand(len(images) * per_image, channels, size, size)
        noise = uniform_noise(len(images) * per_image, channels, size, size, cfg.seed)
        labels = None if label is None else torch.full((len(noise),), label, dtype=torch.long)
        levels = sample_batches(
            net, noise, num_levels, cfg, device, images.repeat_interleave(per_image, 0), known_mask, labels
        )
        # One row per image: original | occluded | completions.
        rows = torch.cat(
            [
                images.float()[:, None] / (num_levels - 1),
                occluded(images, known, num_levels)[:, None],
                levels.float().view(len(images), per_image, channels, size, size) / (num_levels - 1),
            ],
            dim=1,
        )
        grid = make_grid(rows.flatten(0, 1), nrow=2 + per_image, padding=2, pad_value=1.0)
        extra = {"originals": images, "known_mask": known, **({} if labels is None else {"labels": labels})}

    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, output)
    log.info(f"{len(levels)} {'samples' if cfg.mode == 'generate' else 'completions'} written to {output}")
    if cfg.save_levels:
        save_levels(Path(cfg.save_levels), levels, **extra)
        log.info(f"integer samples written to {cfg.save_levels}")
    return levels


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    check_overrides(__file__, "sample")
    main()
