"""Cached sampling must give exactly the naive sampler's images; the SampleGrid callback logs grids.

Nets run in float64 so that rounding differences between the two ways of computing the logits
(~1e-15) cannot move a uniform number across a CDF boundary and flip a sample.
"""

import types

import lightning as L
import pytest
import torch
from helpers import worst_step_difference
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.base import IndexedImages
from pixel_models.architectures import build_network
from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.sampling.generate import NaiveStepper, generate, make_stepper
from pixel_models.training.callbacks import SampleGrid
from pixel_models.training.module import AutoregressiveModule

# Small networks of every architecture with a cached stepper; add one entry per new cached stepper.
ARCHITECTURES = {
    "pixelcnn": {"hidden": 6, "num_layers": 2, "output_hidden": 9},
}
HEIGHT, WIDTH = 6, 5  # not square, so rows and columns cannot be swapped unnoticed


def small_net(arch: str, num_channels: int, num_levels: int = 5, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**ARCHITECTURES[arch], **overrides}
    return build_network(arch, num_channels=num_channels, num_levels=num_levels, **kwargs).double().eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("num_channels", [1, 3])
def test_cached_logits_equal_naive_at_every_step(arch, num_channels):
    """Step by step over an image filled in raster order, as generate does: the logits agree to 1e-9."""
    net = small_net(arch, num_channels)
    image = torch.rand(2, num_channels, HEIGHT, WIDTH, dtype=torch.float64)
    assert worst_step_difference(net, image) < 1e-9


def test_pixelcnn_stepper_with_skip_and_no_residual():
    for residual, skip in [(True, True), (False, True), (False, False)]:
        net = small_net("pixelcnn", 3, residual=residual, skip=skip)
        noise = torch.rand(2, 3, HEIGHT, WIDTH)
        assert torch.equal(generate(net, noise, 5, method="cached"), generate(net, noise, 5, method="naive"))


def test_stepper_can_be_reused_for_a_new_batch():
    net = small_net("pixelcnn", 1)
    stepper = net.cached_stepper()
    net.cached_stepper = lambda label=None: stepper  # generate gets the same stepper twice
    for batch in (3, 2):
        noise = torch.rand(batch, 1, HEIGHT, WIDTH)
        assert torch.equal(generate(net, noise, 5, method="cached"), generate(net, noise, 5, method="naive"))


@pytest.mark.parametrize("kernel, mask_type", [((7, 7), "A"), ((3, 3), "B"), ((1, 3), "B"), ((1, 1), "B")])
def test_masked_conv_at_one_position_equals_the_full_conv(kernel, mask_type):
    conv = MaskedConv2d(6, 9, kernel, mask_type, num_colors=3).double()
    x = torch.randn(2, 6, HEIGHT, WIDTH, dtype=torch.float64)
    at = conv.at_position()
    cache = at.new_cache(2, HEIGHT, WIDTH)
    at.write_rows(cache, 0, x)
    with torch.no_grad():
        full = conv(x)
        for i in range(HEIGHT):
            for j in range(WIDTH):
                torch.testing.assert_close(at.at(cache, i, j), full[:, :, i, j], rtol=0, atol=1e-12)


def test_method_errors():
    net = small_net("pixelcnn", 1)
    with pytest.raises(ValueError, match="choose cached or naive"):
        make_stepper(net, "fast")
    plain = torch.nn.Sequential(torch.nn.Identity())
    with pytest.raises(ValueError, match="method=naive"):
        make_stepper(plain, "cached")
    with pytest.raises(ValueError, match="choose cached or naive"):
        make_stepper(net, "auto")  # no silent fallback to the slow sampler
    assert isinstance(make_stepper(net, "naive"), NaiveStepper)


# ----------------------------------------------------------------------------------------------------
# SampleGrid


def tiny_module(image_size: int = 6) -> AutoregressiveModule:
    net = {"arch": "pixelcnn", "hidden": 4, "num_layers": 1, "output_hidden": 8}
    return AutoregressiveModule(net, num_channels=1, num_levels=4, image_size=image_size)


def test_sample_grid_writes_png_with_csv_logger(tmp_path):
    levels = torch.randint(0, 4, (8, 1, 6, 6))
    loader = DataLoader(IndexedImages(levels), batch_size=4)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
        callbacks=[SampleGrid(every_n_epochs=1, num_samples=4)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    module = tiny_module()
    trainer.fit(module, loader)
    png = tmp_path / "samples" / "epoch_000.png"
    with Image.open(png) as image:
        assert image.size == (2 * (6 + 2) + 2,) * 2  # 2 x 2 samples of 6x6, 2-pixel padding
    assert module.training


def epoch_end_trainer(tmp_path, logger, current_epoch: int, global_step: int) -> types.SimpleNamespace:
    """What SampleGrid reads of the trainer at a training epoch's end, on the global-zero process."""
    return types.SimpleNamespace(
        current_epoch=current_epoch,
        global_step=global_step,
        sanity_checking=False,
        is_global_zero=True,
        loggers=[logger],
        default_root_dir=str(tmp_path),
    )


class RecordingWandb(WandbLogger):
    """Only what SampleGrid uses: log_image, recorded."""

    def __init__(self):
        self.logged = []

    def log_image(self, key, images, step=None, **kwargs):
        self.logged.append((key, images, step))


def test_sample_grid_gives_wandb_uint8_hwc_and_leaves_rng_and_mode_alone(tmp_path):
    module = tiny_module(image_size=5).train()
    wandb = RecordingWandb()
    trainer = epoch_end_trainer(tmp_path, wandb, current_epoch=1, global_step=7)
    callback = SampleGrid(every_n_epochs=2, num_samples=3)
    state = torch.get_rng_state()
    callback.on_train_epoch_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), state)
    assert module.training
    ((key, (image,), step),) = wandb.logged
    assert key == "samples" and step == 7
    assert image.dtype == "uint8" and image.shape == (2 * 7 + 2, 2 * 7 + 2, 3)
    assert not (tmp_path / "samples").exists()  # W&B took it: no file
    trainer.current_epoch = 2  # not a multiple of every_n_epochs (epochs count from 0)
    callback.on_train_epoch_end(trainer, module)
    assert len(wandb.logged) == 1


def test_sample_grid_goes_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = epoch_end_trainer(tmp_path, logger, current_epoch=0, global_step=3)
    SampleGrid(every_n_epochs=1, num_samples=2).on_train_epoch_end(trainer, tiny_module(image_size=4))
    logger.experiment.flush()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "samples").exists()


def test_sample_grid_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_epochs"):
        SampleGrid(every_n_epochs=0)
    with pytest.raises(ValueError, match="choose cached or naive"):
        SampleGrid(method="fast")
