"""Class-conditional models end to end: train.py with model.conditional=true for every architecture, the
per-class NLL in metrics.json, sample.py label=<class> / label=all / completion with a label, the class
grid of the sample-grid callback, and the refusals (data without labels, a label for an unconditional
checkpoint, a bad label)."""

import json
import types

import pytest
import torch
from helpers import ROOT, compose_train, run_script
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from datamodules.digits import DigitsDataModule
from pixel_models.training.callbacks import SampleGrid
from pixel_models.training.checkpoint import load_module
from pixel_models.training.likelihood import SplitNLL
from pixel_models.training.module import AutoregressiveModule
from sample import sample

# Two of them in the default run (the contract test covers conditioning in every network); all with -m slow.
ARCHITECTURES = [
    pytest.param(arch, marks=[] if arch in ("pixelcnn", "gated_pixelcnn") else pytest.mark.slow)
    for arch in sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
]
SIZE = 8


def train_conditional(tmp_path, arch: str, *overrides: str):
    from train import train

    cfg = compose_train(
        f"output_dir={tmp_path}",
        f"model={arch}",
        "trainer.accelerator=cpu",
        "callbacks.progress_bar=null",
        "debug=fast",
        # PixelCNN++ has filters, not a hidden width
        "model.net.num_filters=8" if arch == "pixelcnn_pp" else "model.net.hidden=8",
        "model.conditional=true",
        "model.label_dropout=0.2",
        *overrides,
    )
    return train(cfg)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_conditional_training_reports_per_class_nll_and_samples_class_rows(tmp_path, arch):
    metric = train_conditional(tmp_path, arch)
    assert metric is not None and 0 < metric < 1e4
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    per_class = metrics["test/nll_per_class"]
    assert set(per_class) <= {str(k) for k in range(10)} and len(per_class) >= 2
    # debug=fast tests 2 batches of 64: the classes of those 128 images weight the table back to test/nll.
    data = DigitsDataModule()
    data.setup("test")
    counts = torch.bincount(data.labels["test"][: int(metrics["test/num_images"])], minlength=10).tolist()
    weighted = sum(counts[int(k)] * v for k, v in per_class.items()) / sum(counts)
    assert weighted == pytest.approx(metrics["test/nll"], rel=1e-9)
    assert not any("/nll_class_" in k for k in metrics)  # logged float32 copies, not in the report
    assert set(metrics["val/nll_per_class"]) == {str(k) for k in range(10)}  # the best checkpoint's
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.conditional and module.num_classes == 10
    with Image.open(tmp_path / "samples.png") as image:  # final_samples=4: one row per class, 1 per row
        assert image.size == (SIZE + 4, 10 * (SIZE + 2) + 2)


def test_per_class_nll_is_exact_and_counts_a_repeat_once():
    split = SplitNLL(5)
    split.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]))
    split.update(torch.tensor([4.0, 5.0, 1.0]), torch.tensor([3, 4, 0]), torch.tensor([1, 1, 0]))  # 0 again
    assert split.per_class_mean() == {0: (2.0, 2), 1: (11.0 / 3, 3)}
    assert split.mean() == pytest.approx(3.0)
    assert SplitNLL(3).per_class_mean() == {}


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conditional")
    train_conditional(folder, "gated_pixelcnn", "final_samples=0", "test=false")
    return folder / "checkpoints" / "last.ckpt"


def run_sample(ckpt, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        overrides = [f"ckpt_path={ckpt}", f"output={tmp_path / 'grid.png'}", *overrides]
        return sample(compose(config_name="sample", overrides=overrides))


def test_sample_one_class_every_class_and_complete_with_a_label(conditional_ckpt, tmp_path):
    levels = run_sample(
        conditional_ckpt, tmp_path, "label=3", "num_samples=3", "save_levels=" + str(tmp_path / "s.pt")
    )
    assert levels.shape == (3, 1, SIZE, SIZE)
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["labels"], torch.full((3,), 3))
    # The same noise with the class given to the network directly gives the same images.
    module = load_module(conditional_ckpt)
    from pixel_models.sampling.generate import generate, uniform_noise

    noise = uniform_noise(3, 1, SIZE, SIZE, seed=0)
    assert torch.equal(levels, generate(module.net, noise, module.num_levels, label=torch.full((3,), 3)))

    levels = run_sample(conditional_ckpt, tmp_path, "label=all", "num_samples=15")
    assert levels.shape == (20, 1, SIZE, SIZE)  # 10 rows of ceil(15 / 10) = 2
    with Image.open(tmp_path / "grid.png") as image:
        assert image.size == (2 * (SIZE + 2) + 2, 10 * (SIZE + 2) + 2)

    done = run_sample(conditional_ckpt, tmp_path, "mode=complete", "label=7", "num_images=2")
    assert done.shape == (8, 1, SIZE, SIZE)


@pytest.mark.parametrize(
    "label, match",
    [
        ("10", "class 0..9 or 'all'"),
        ("-1", "class 0..9 or 'all'"),
        ("three", "class 0..9 or 'all'"),
        ("true", "class 0..9 or 'all'"),
        ("2.0", "class 0..9 or 'all'"),
    ],
)
def test_bad_labels_are_refused(conditional_ckpt, tmp_path, label, match):
    with pytest.raises(ValueError, match=match):
        run_sample(conditional_ckpt, tmp_path, f"label={label}")


def test_label_all_is_for_generation(conditional_ckpt, tmp_path):
    with pytest.raises(ValueError, match="label=all .* is for mode=generate"):
        run_sample(conditional_ckpt, tmp_path, "mode=complete", "label=all")


def test_a_label_for_an_unconditional_checkpoint_is_refused(tmp_path):
    from train import train

    train(
        compose_train(
            f"output_dir={tmp_path}",
            "trainer.accelerator=cpu",
            "callbacks.progress_bar=null",
            "debug=fast",
            "model.net.hidden=4",
            "final_samples=0",
            "test=false",
        )
    )
    with pytest.raises(ValueError, match="unconditional"):
        run_sample(tmp_path / "checkpoints" / "last.ckpt", tmp_path, "label=3")


def test_sample_grid_callback_shows_one_row_per_class(conditional_ckpt):
    module = load_module(conditional_ckpt)
    grid = SampleGrid(every_n_epochs=1, num_samples=16).sample(module)
    assert grid.shape == (3, 10 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # 10 rows of ceil(16 / 10) = 2


def test_conditional_model_on_binarized_mnist_is_refused_before_training(tmp_path):
    result = run_script(
        "train.py",
        "data=binarized_mnist",
        f"data.data_dir={tmp_path / 'none'}",
        "model.conditional=true",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
        timeout=120,
    )
    assert result.returncode != 0
    assert "model.conditional=true needs data with classes" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "none").exists()  # nothing was downloaded or created


class RecordingWandb(WandbLogger):
    """Only what SampleGrid uses: log_image, recorded."""

    def __init__(self):
        self.logged = []

    def log_image(self, key, images, step=None, **kwargs):
        self.logged.append((key, images, kwargs.get("caption")))


def test_sample_grid_callback_gives_wandb_the_class_grid(tmp_path):
    net = {"arch": "gated_pixelcnn", "hidden": 4, "num_layers": 1, "output_hidden": 8}
    module = AutoregressiveModule(net, 1, 4, 5, conditional=True, num_classes=3)
    wandb = RecordingWandb()
    trainer = types.SimpleNamespace(
        current_epoch=0, global_step=2, sanity_checking=False, is_global_zero=True, loggers=[wandb]
    )
    SampleGrid(every_n_epochs=1, num_samples=4).on_train_epoch_end(trainer, module)
    ((key, (image,), caption),) = wandb.logged
    assert key == "samples" and caption == ["one row per class, 0..2"]
    assert image.dtype == "uint8" and image.shape == (3 * 7 + 2, 2 * 7 + 2, 3)  # 3 rows of ceil(4 / 3) = 2
