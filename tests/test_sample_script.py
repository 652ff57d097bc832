"""sample.py end to end: generation and completion, both methods, its outputs and its errors."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ROOT, run_script
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from pixel_models.training.callbacks import StoreDataConfig
from pixel_models.training.checkpoint import CheckpointError
from pixel_models.training.module import AutoregressiveModule
from sample import sample

TINY_NET = {"arch": "pixelcnn", "hidden": 4, "num_layers": 1, "output_hidden": 8}
SIZE, K = 8, 17  # the bundled digits


def grid_size(rows: int, cols: int, size: int = SIZE) -> tuple[int, int]:
    """(width, height) of a make_grid of rows x cols images with 2-pixel padding."""
    return cols * (size + 2) + 2, rows * (size + 2) + 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A digits checkpoint trained for one batch as train.py writes it (data_config included), the same
    without data_config, and an untrained RGB one (6x6, K=4) saved by hand."""
    folder = tmp_path_factory.mktemp("ckpts")
    data_config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "data" / "digits.yaml"))
    torch.manual_seed(0)
    module = AutoregressiveModule(TINY_NET, num_channels=1, num_levels=K, image_size=SIZE)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StoreDataConfig(data_config)],
        default_root_dir=folder,
    )
    trainer.fit(module, datamodule=instantiate(data_config))
    trainer.save_checkpoint(folder / "digits.ckpt")
    ckpt = torch.load(folder / "digits.ckpt", weights_only=True)
    # the conf/data option's name and its plain values, never a _target_
    assert ckpt["data_config"] == {"name": "digits"} | {
        k: v for k, v in data_config.items() if k != "_target_"
    }
    torch.save(ckpt | {"data_config": data_config}, folder / "old_format.ckpt")  # as written before: _target_
    del ckpt["data_config"]
    torch.save(ckpt, folder / "no_data.ckpt")
    rgb = AutoregressiveModule(TINY_NET | {"hidden": 6}, num_channels=3, num_levels=4, image_size=6)
    torch.save({"state_dict": rgb.state_dict(), "hyper_parameters": dict(rgb.hparams)}, folder / "rgb.ckpt")
    return folder


def run(ckpt: Path, tmp_path: Path, *overrides: str) -> torch.Tensor:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = [f"ckpt_path={ckpt}", f"output={tmp_path / 'grid.png'}", *overrides]
        cfg = compose(config_name="sample", overrides=overrides)
    return sample(cfg)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_generate_both_methods_same_samples_grid_and_levels(ckpts, tmp_path):
    common = ("num_samples=5", "batch_size=2", "temperature=0.9", "device=cpu")
    cached = run(ckpts / "digits.ckpt", tmp_path, *common, f"save_levels={tmp_path / 'levels.pt'}")
    assert png_size(tmp_path / "grid.png") == grid_size(2, 3)  # 5 samples, 3 per row
    saved = torch.load(tmp_path / "levels.pt", weights_only=True)
    assert saved.shape == (5, 1, SIZE, SIZE) and saved.dtype == torch.uint8 and int(saved.max()) < K
    npz = tmp_path / "levels.npz"
    naive = run(ckpts / "digits.ckpt", tmp_path, *common, "method=naive", f"save_levels={npz}")
    assert torch.equal(cached, naive)
    assert np.array_equal(np.load(npz)["levels"], saved.numpy())


def test_complete_dataset_images(ckpts, tmp_path):
    common = ("mode=complete", "num_images=3", "completions_per_image=2", "batch_size=4")
    cached = run(ckpts / "digits.ckpt", tmp_path, *common, f"save_levels={tmp_path / 'done.npz'}")
    assert png_size(tmp_path / "grid.png") == grid_size(3, 2 + 2)  # original | occluded | 2 completions
    saved = np.load(tmp_path / "done.npz")
    originals, known = torch.from_numpy(saved["originals"]).long(), torch.from_numpy(saved["known_mask"])
    assert originals.shape == (3, 1, SIZE, SIZE) and known.shape == (SIZE, SIZE) and known[: SIZE // 2].all()
    completions = cached.view(3, 2, 1, SIZE, SIZE)
    assert (completions[..., known] == originals[:, None][..., known]).all()  # known pixels never change
    assert int(cached.max()) < K and int(saved["levels"].max()) < K
    naive = run(ckpts / "digits.ckpt", tmp_path, *common, "method=naive")
    assert torch.equal(cached, naive)


def test_complete_image_file_with_mask_file(ckpts, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")  # RGB, converted to grey for this model
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, :3] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    levels = run(
        ckpts / "digits.ckpt",
        tmp_path,
        "mode=complete",
        f"image={tmp_path / 'photo.png'}",
        f"mask={tmp_path / 'mask.png'}",
        "completions_per_image=3",
    )
    assert png_size(tmp_path / "grid.png") == grid_size(1, 2 + 3)
    grey = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float64)
    expected = torch.from_numpy(np.round(grey / 255 * (K - 1))).long()
    assert (levels[:, 0, :, :3] == expected[:, :3]).all()


def test_complete_rgb_left_half(ckpts, tmp_path):
    levels = run(
        ckpts / "rgb.ckpt",
        tmp_path,
        "mode=complete",
        "mask=left_half",
        "completions_per_image=2",
        f"image={_rgb_png(tmp_path)}",
    )
    assert levels.shape == (2, 3, 6, 6) and int(levels.max()) < 4
    assert png_size(tmp_path / "grid.png") == grid_size(1, 4, size=6)


def _rgb_png(tmp_path: Path) -> Path:
    pixels = np.zeros((6, 6, 3), dtype=np.uint8)
    pixels[..., 0] = 255  # pure red: levels (3, 0, 0) at K=4
    Image.fromarray(pixels).save(tmp_path / "red.png")
    return tmp_path / "red.png"


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (("mode=dream",), ValueError, "choose generate or complete"),
        (("method=fast",), ValueError, "choose cached or naive"),
        (("mode=complete", "mask=bottom"), ValueError, "unknown mask"),
        (("mode=complete", "mask=missing.png"), ValueError, "mask file not found"),
        (("mode=complete", "split=holdout"), ValueError, "choose train, val or test"),
        (("mode=complete", "data_dir=/tmp"), ValueError, "takes no data_dir"),
    ],
)
def test_clear_errors(ckpts, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        run(ckpts / "digits.ckpt", tmp_path, *overrides)


def test_checkpoint_and_image_errors(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run(tmp_path / "nope.ckpt", tmp_path)
    with pytest.raises(CheckpointError, match="no data_config"):
        run(ckpts / "no_data.ckpt", tmp_path, "mode=complete")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="is 10x10; the model takes 8x8"):
        run(ckpts / "digits.ckpt", tmp_path, "mode=complete", f"image={tmp_path / 'big.png'}")
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(tmp_path / "small_mask.png")
    with pytest.raises(ValueError, match="mask .* is 5x5"):
        run(ckpts / "digits.ckpt", tmp_path, "mode=complete", f"mask={tmp_path / 'small_mask.png'}")


def test_command_line(ckpts, tmp_path):
    run_script(
        "sample.py",
        f"ckpt_path={ckpts / 'digits.ckpt'}",
        "num_samples=2",
        f"output={tmp_path / 'cli.png'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert png_size(tmp_path / "cli.png") == grid_size(1, 2)
