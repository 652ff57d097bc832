"""Evaluate a checkpoint on a whole split: exact NLL in nats per image and bits per sub-pixel, and pictures.

    python evaluate.py ckpt_path=outputs/train/runs/<run>/checkpoints/<best>.ckpt            # validation
    python evaluate.py ckpt_path=<file.ckpt> split=test
    python evaluate.py ckpt_path=<file.ckpt> data_dir=../shared/data                         # MNIST files

The split is the checkpoint's own dataset's (rebuilt from its ``data_config`` as sample.py does;
``data_dir`` says where its files are). Written to the run directory (``outputs/evaluate/runs/<time>``):

- ``evaluation.json``: ``<split>/nll`` (nats per image), ``<split>/bpd`` (bits per sub-pixel),
  ``<split>/num_images``, the checkpoint with its epoch and step, per-class NLL where the data has
  labels, and the highest- and lowest-NLL images;
- ``bits_map.png`` (and the numbers, ``bits_map.npy``, (C, H, W)): the mean NLL in bits of each
  sub-pixel position over the split, one map per colour, with a colour scale;
- ``extremes.png``: the ``num_extremes`` images with the highest and the lowest NLL, their values under
  them;
- ``per_image.csv``: index, label, nats and bits/dim of every image.
"""

import csv
import json
import logging
import math
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.progress import Progress

from pixel_models.cli import check_overrides, user_errors
from pixel_models.evaluation.bits_map import bits_map_image
from pixel_models.evaluation.extremes import extremes_grid
from pixel_models.evaluation.split_nll import evaluate_split
from pixel_models.training.allocator import reuse_freed_memory
from pixel_models.training.checkpoint import (
    CheckpointError,
    check_data_matches,
    load_checkpoint,
    module_from_checkpoint,
)
from sample import SPLIT_STAGES, checkpoint_datamodule, pick_device

log = logging.getLogger("evaluate")


def check_settings(cfg: DictConfig) -> None:
    if type(cfg.reuse_freed_memory) is not bool:
        raise ValueError(f"reuse_freed_memory must be true or false, got {cfg.reuse_freed_memory!r}")
    if cfg.split not in SPLIT_STAGES:
        raise ValueError(f"unknown split {cfg.split!r}; choose train, val or test")
    if not isinstance(cfg.num_extremes, int) or isinstance(cfg.num_extremes, bool) or cfg.num_extremes < 0:
        raise ValueError(f"num_extremes must be a whole number >= 0, got {cfg.num_extremes!r}")
    if cfg.batch_size is not None and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise ValueError(f"batch_size must be a whole number >= 1 (or null), got {cfg.batch_size!r}")


def evaluate(cfg: DictConfig) -> dict:
    """Runs evaluate.py; returns what it wrote to ``evaluation.json``."""
    check_settings(cfg)
    device = pick_device(cfg.device)
    ckpt = load_checkpoint(cfg.ckpt_path)  # weights_only=True
    if not ckpt.get("data_config") or not isinstance(ckpt["data_config"], dict):
        raise CheckpointError(
            f"{cfg.ckpt_path} holds no data_config (not written by train.py): its dataset is unknown"
        )
    module = module_from_checkpoint(ckpt).eval()
    overrides = {"batch_size": cfg.batch_size} if cfg.batch_size is not None else {}
    datamodule = checkpoint_datamodule(ckpt, cfg.ckpt_path, cfg.split, cfg.data_dir, **overrides)
    check_data_matches(module, datamodule, ckpt)
    if cfg.reuse_freed_memory:  # every batch's activations would otherwise be faulted in afresh
        log.info(f"memory: {reuse_freed_memory()}")
    images = datamodule.splits[cfg.split]
    loader = {
        "train": datamodule.train_dataloader,
        "val": datamodule.val_dataloader,
        "test": datamodule.test_dataloader,
    }[cfg.split]()

    with Progress() as progress:
        task = progress.add_task(f"evaluating {cfg.split}, images", total=len(images))
        result = evaluate_split(
            module.to(device), loader, len(images), device, lambda n: progress.advance(task, n)
        )

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    split, dims = cfg.split, result.dims
    where = f"epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}"
    highest, lowest = result.extremes(cfg.num_extremes)
    labels = result.labels
    per_class = result.per_class()

    def listed(indices):
        return [
            {"index": i, "nll": float(result.nll[i]), **({"label": int(labels[i])} if labels[i] >= 0 else {})}
            for i in indices.tolist()
        ]

    summary = {
        "checkpoint": str(cfg.ckpt_path),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "params": sum(p.numel() for p in module.parameters()),
        "data": ckpt["data_config"].get("name") or ckpt["data_config"].get("_target_"),
        "conditional": bool(getattr(module, "conditional", False)),  # then NLL is -log p(x | label)
        "split": split,
        f"{split}/nll": result.mean_nll,
        f"{split}/bpd": result.bpd,
        f"{split}/num_images": result.num_images,
        "dims_per_image": dims,
        "per_class": {str(k): v for k, v in per_class.items()},
        "highest": listed(highest),
        "lowest": listed(lowest),
        "bits_map_max": float(result.bits_map.max()),
        "files": {
            "bits_map": "bits_map.png",
            "bits_map_array": "bits_map.npy",
            "extremes": "extremes.png",
            "per_image": "per_image.csv",
        },
    }

    np.save(out / "bits_map.npy", result.bits_map.numpy())
    title = f"{split}: mean bits per sub-pixel ({result.num_images} images, {result.bpd:.4f} bits/dim)"
    bits_map_image(result.bits_map, title).save(out / "bits_map.png")

    def shown(indices):  # a slice reads the image as levels from in-memory and on-disk splits alike
        return [(images[i : i + 1][0], float(result.nll[i]), i) for i in indices.tolist()]

    extremes_grid(shown(highest), shown(lowest), module.num_levels).save(out / "extremes.png")
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "nll_nats", "bits_per_dim"])
        for i, nats in enumerate(result.nll.tolist()):
            label = int(labels[i]) if labels[i] >= 0 else ""
            writer.writerow([i, label, f"{nats:.6f}", f"{nats / (dims * math.log(2)):.6f}"])
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")

    log.info(
        f"{split} NLL: {result.mean_nll:.6f} nats/image = {result.bpd:.6f} bits/dim over "
        f"{result.num_images} images ({cfg.ckpt_path}, {where})"
    )
    for label, value in per_class.items():
        log.info(
            f"  class {label}: {value['nll']:.4f} nats/image = {value['bpd']:.6f} bits/dim "
            f"({value['num_images']} images)"
        )
    log.info(f"written to {out}: evaluation.json, bits_map.png, bits_map.npy, extremes.png, per_image.csv")
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors():  # a user error: one line, exit code 2
        evaluate(cfg)


if __name__ == "__main__":
    check_overrides(__file__, "evaluate")
    main()
