"""train.py end to end on the new data modules: a folder of PNGs and official-format ImageNet files."""

import json
import os

import numpy as np
from helpers import TINY_RUN, compose_train
from PIL import Image
from sklearn.datasets import load_digits
from test_imagenet_data import write_official

from pixel_models.training.checkpoint import load_checkpoint


def digits_folder(root, count: int) -> None:
    """The first ``count`` sklearn digits as 8x8 grey PNGs in class folders 0..9, as a user's folder."""
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:count], digits.target[:count], strict=True)):
        os.makedirs(root / str(label), exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i:04d}.png")


def test_train_and_sample_on_an_image_folder(tmp_path):
    digits_folder(tmp_path / "digits", 120)
    from train import train

    run_dir = tmp_path / "run"
    cfg = compose_train(
        f"output_dir={run_dir}",
        *TINY_RUN,
        "data=image_folder",
        f"data.path={tmp_path / 'digits'}",
        "data.image_size=8",
        "data.num_channels=1",
        "data.num_levels=8",
        "data.num_classes=10",
        "model.conditional=true",  # the folder names are the labels
        "trainer.max_epochs=1",
        "final_samples=4",
    )
    assert train(cfg) is not None
    assert (run_dir / "samples.png").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/num_images"] == 12 and metrics["test/num_images"] == 12
    assert os.listdir(tmp_path / "digits" / ".pixel_models_cache") == ["s8-c1-k8.npz"]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["data_config"]["path"] == str(tmp_path / "digits")


def test_train_on_imagenet32_files(tmp_path):
    from train import train

    write_official(tmp_path / "data", 32, counts=(2,) * 10, val_count=3)
    cfg = compose_train(
        f"output_dir={tmp_path / 'run'}",
        *(o for o in TINY_RUN if not o.startswith("callbacks.completion_grid")),
        # the completion grid reads validation images from the on-disk split
        "callbacks.completion_grid.every_n_epochs=1",
        "callbacks.completion_grid.num_images=2",
        "callbacks.completion_grid.completions_per_image=1",
        "data=imagenet32",
        f"data.data_dir={tmp_path / 'data'}",
        "data.val_size=4",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "model.net.num_layers=1",
        "model.conditional=true",
    )
    metric = train(cfg)
    assert metric is not None and np.isfinite(metric)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/num_images"] == 4 and metrics["test/num_images"] == 3
    assert list((tmp_path / "run" / "completions").glob("epoch_*.png")), "the completion grid ran"
