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
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from rich.progress import Progress
from torchvision.utils import make_grid, save_image

from pixel_models.sampling.generate import check_method, class_rows, generate, levels_grid, uniform_noise
from pixel_models.training.checkpoint import CheckpointError, load_checkpoint, load_module

log = logging.getLogger("sample")

MODES = ("generate", "complete")
SPLIT_STAGES = {"train": "fit", "val": "validate", "test": "test"}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


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
    if data_dir is not None:
        if "data_dir" not in data_config:
            raise ValueError(f"the checkpoint's dataset ({data_config.get('_target_')}) takes no data_dir")
        overrides["data_dir"] = data_dir
    datamodule = instantiate(data_config, **overrides)
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
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}; the model takes {size}x{size} images")
    values = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0)
    values = values[None] if channels == 1 else values.permute(2, 0, 1)
    return (values * (num_levels - 1)).round().long()[None]


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
        with Image.open(mask) as image:
            grey = np.asarray(image.convert("L"))
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
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; choose generate or complete")
    check_method(cfg.method)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {cfg.batch_size}")
    device = pick_device(cfg.device)
    module = load_module(cfg.ckpt_path)
    label = check_label(cfg.get("label"), module, cfg.mode)
    net = module.net.to(device)
    size, channels, num_levels = module.image_size, module.num_channels, module.num_levels
    output = Path(cfg.output)

    if cfg.mode == "generate":
        if cfg.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {cfg.num_samples}")
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
        if cfg.completions_per_image < 1 or cfg.num_images < 1:
            raise ValueError("num_images and completions_per_image must be positive")
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
    sample(cfg)


if __name__ == "__main__":
    main()
