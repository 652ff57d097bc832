"""Sample images from a trained checkpoint into a PNG grid.

    python sample.py ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt num_samples=64 output=samples.png
"""

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import Progress
from torchvision.utils import save_image

from pixel_models.checkpoint import load_module
from pixel_models.sampling import generate

log = logging.getLogger("sample")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def save_levels(levels: torch.Tensor, path: Path) -> None:
    if path.suffix == ".pt":
        torch.save(levels.to(torch.uint8 if levels.max() < 256 else torch.int16), path)
    elif path.suffix == ".npz":
        np.savez_compressed(path, levels=levels.numpy())
    else:
        raise ValueError(f"save_levels must end in .pt or .npz, got {path}")


def sample(cfg: DictConfig) -> torch.Tensor:
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ValueError("num_samples and batch_size must be positive")
    module = load_module(cfg.ckpt_path)
    device = pick_device(cfg.device)
    net = module.net.to(device)
    size, channels, levels_k = module.image_size, module.num_channels, module.num_levels
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.rand(cfg.num_samples, channels, size, size, generator=generator)
    batches = []
    with Progress() as progress:
        rows = progress.add_task("rows", total=size * -(-cfg.num_samples // cfg.batch_size))
        for batch_noise in noise.split(cfg.batch_size):
            batches.append(
                generate(
                    net, batch_noise.to(device), levels_k, cfg.temperature, cfg.method,
                    on_row=lambda i: progress.advance(rows),
                ).cpu()
            )
    levels = torch.cat(batches)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_image(levels.float() / (levels_k - 1), output, nrow=int(cfg.num_samples**0.5 + 0.5))
    log.info(f"{cfg.num_samples} samples written to {output}")
    if cfg.save_levels:
        save_levels(levels, Path(cfg.save_levels))
        log.info(f"integer samples written to {cfg.save_levels}")
    return levels


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
