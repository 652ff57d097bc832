"""evaluate.py and pixel_models.evaluation: per-sub-pixel NLL, whole-split sums, the pictures, the command."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_RUN, compose_train, run_script
from PIL import Image

from pixel_models.evaluation.bits_map import bits_map_image
from pixel_models.evaluation.drawing import colorize
from pixel_models.evaluation.extremes import extremes_grid
from pixel_models.evaluation.split_nll import evaluate_split, subpixel_nll
from pixel_models.training.checkpoint import CheckpointError
from pixel_models.training.module import AutoregressiveModule

# ../shared/data beside the project folder (one level further up from a git worktree in a subfolder)
BINARIZED_MNIST = next(
    (d for d in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if d.is_dir()),
    ROOT.parent / "shared" / "data",
)


def small_module(channels=3, levels=4, size=5, **kwargs):
    net = {"arch": "pixelcnn", "hidden": 8, "num_layers": 2, "output_hidden": 8}
    return AutoregressiveModule(
        net, num_channels=channels, num_levels=levels, image_size=size, **kwargs
    ).eval()


def reference_nll(module, levels):
    """-log p of each sub-pixel from the softmax written out: exp(l) / sum exp, at the true level."""
    with torch.no_grad():
        logits = module(levels.float() / (module.num_levels - 1)).double()
    probs = logits.exp() / logits.exp().sum(1, keepdim=True)
    b, c, h, w = levels.shape
    out = torch.empty(b, c, h, w, dtype=torch.float64)
    for i in range(b):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    out[i, ch, y, x] = -math.log(probs[i, levels[i, ch, y, x], ch, y, x])
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_subpixel_nll_is_minus_log_softmax_at_the_true_level(channels):
    module = small_module(channels)
    levels = torch.randint(0, 4, (3, channels, 5, 5))
    with torch.no_grad():
        per_subpixel = subpixel_nll(module, levels)
        per_image = module.nll(levels)  # the training loss' per-image NLL
    assert per_subpixel.shape == (3, channels, 5, 5)
    torch.testing.assert_close(per_subpixel.double(), reference_nll(module, levels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_subpixel.sum((1, 2, 3)), per_image, rtol=1e-5, atol=1e-4)


def test_split_evaluation_counts_each_image_once_in_any_order():
    module = small_module(3)
    images = torch.randint(0, 4, (7, 3, 5, 5))
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2])
    order = [[4, 1, 6], [0, 5], [3, 2]]  # shuffled, uneven batches
    loader = [{"levels": images[i], "index": torch.tensor(i), "label": labels[i]} for i in order]
    result = evaluate_split(module, loader, 7, torch.device("cpu"))

    expected = reference_nll(module, images)
    torch.testing.assert_close(result.nll, expected.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(result.bits_map, expected.mean(0) / math.log(2), rtol=1e-5, atol=1e-5)
    assert result.bpd == pytest.approx(float(expected.mean()) / math.log(2), rel=1e-5)
    assert result.bits_map.mean().item() == pytest.approx(
        result.bpd, rel=1e-9
    )  # the map averages to bits/dim
    per_class = result.per_class()
    for label in (0, 1, 2):
        mine = expected.sum((1, 2, 3))[labels == label]
        assert per_class[label]["nll"] == pytest.approx(float(mine.mean()), rel=1e-5)
        assert per_class[label]["num_images"] == len(mine)
        assert per_class[label]["bpd"] == pytest.approx(
            per_class[label]["nll"] / (75 * math.log(2)), rel=1e-12
        )
    highest, lowest = result.extremes(3)
    ranked = torch.argsort(expected.sum((1, 2, 3)))
    assert highest.tolist() == ranked.flip(0)[:3].tolist() and lowest.tolist() == ranked[:3].tolist()

    # a conditional model is evaluated given each image's label: -log p(x | label), as in training
    conditional = small_module(3, conditional=True, num_classes=3)
    given = evaluate_split(conditional, loader, 7, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(given.nll, conditional.nll(images, labels).double(), rtol=1e-5, atol=1e-4)

    with pytest.raises(RuntimeError, match="exactly once"):
        evaluate_split(module, loader[:2], 7, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="exactly once"):
        evaluate_split(module, [*loader, loader[0]], 7, torch.device("cpu"))


def test_bits_map_shows_each_colour_on_one_scale():
    bits = torch.zeros(3, 4, 4, dtype=torch.float64)
    bits[0, 0, 0], bits[2, 3, 3] = 6.0, 3.0
    image = np.asarray(bits_map_image(bits, "title", target_width=40))  # 10 x 10 screen pixels per position
    brightest, darkest, middle = colorize(np.array([6.0, 0.0, 3.0]), 6.0)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert tuple(brightest) in colours and tuple(middle) in colours and tuple(darkest) in colours
    # R's first position is the brightest, B's last the middle colour; the three maps sit side by side
    top_rows = [y for y in range(image.shape[0]) if (image[y] == brightest).all(-1).sum() >= 10]
    assert top_rows, "the brightest position (and the top of the colour bar) are drawn"
    assert image.shape[1] > 3 * 40


def test_extremes_grid_has_a_tile_per_image():
    images = torch.randint(0, 4, (6, 1, 5, 5))
    nll = torch.arange(6, dtype=torch.float64)

    def shown(indices):
        return [(images[i], float(nll[i]), i) for i in indices]

    grid = extremes_grid(shown([5, 4]), shown([0, 1]), num_levels=4, tile=20)
    assert isinstance(grid, Image.Image) and grid.width >= 2 * 20 and grid.height >= 2 * 20


def train_tiny(out, *overrides):
    from train import train

    train(compose_train(f"output_dir={out}", *TINY_RUN, *overrides))
    return json.loads((out / "metrics.json").read_text())


def evaluate_py(tmp_path, name, ckpt, *args):
    run_dir = tmp_path / name
    result = run_script("evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={run_dir}", *args)
    return result, run_dir, json.loads((run_dir / "evaluation.json").read_text())


def test_evaluate_command_on_digits(tmp_path):
    metrics = train_tiny(tmp_path / "train", "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    ckpt = metrics["best/checkpoint"]
    result, run_dir, summary = evaluate_py(tmp_path, "val", ckpt, "num_extremes=4")
    # the same exact NLL training reported for this checkpoint, and its bits/dim
    assert summary["val/nll"] == pytest.approx(metrics["best/val/nll"], rel=1e-6)
    assert summary["val/bpd"] == pytest.approx(summary["val/nll"] / (64 * math.log(2)), rel=1e-12)
    assert summary["val/num_images"] == 300 and summary["epoch"] == metrics["best/epoch"]
    assert (
        "val NLL:" in result.stdout + result.stderr
        and "bits/dim over 300 images" in result.stdout + result.stderr
    )
    assert np.load(run_dir / "bits_map.npy").shape == (1, 8, 8)
    assert np.load(run_dir / "bits_map.npy").mean() == pytest.approx(summary["val/bpd"], rel=1e-9)
    for picture in ("bits_map.png", "extremes.png"):
        assert Image.open(run_dir / picture).size[0] > 100
    assert [h["nll"] for h in summary["highest"]] == sorted(
        (h["nll"] for h in summary["highest"]), reverse=True
    )
    assert len(summary["highest"]) == len(summary["lowest"]) == 4
    # the digits carry their class: per-class NLL, which averages back to the split's
    per_class = summary["per_class"]
    assert sorted(per_class, key=int) == [str(d) for d in range(10)]
    assert sum(c["num_images"] for c in per_class.values()) == 300
    weighted = sum(c["nll"] * c["num_images"] for c in per_class.values()) / 300
    assert weighted == pytest.approx(summary["val/nll"], rel=1e-9)
    rows = list(csv.DictReader(open(run_dir / "per_image.csv")))
    assert len(rows) == 300
    assert sum(float(r["nll_nats"]) for r in rows) / 300 == pytest.approx(summary["val/nll"], rel=1e-6)

    test = evaluate_in_process(tmp_path / "test", f"ckpt_path={ckpt}", "split=test")
    assert test["test/nll"] == pytest.approx(metrics["test/nll"], rel=1e-6)


def evaluate_in_process(out, *overrides):
    from hydra import compose, initialize_config_dir

    from evaluate import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return evaluate(compose(config_name="evaluate", overrides=[f"output_dir={out}", *overrides]))


def test_evaluate_bad_settings_are_refused_before_any_work(tmp_path):
    metrics = train_tiny(tmp_path / "train", "debug=fast", "test=false")
    ckpt = metrics["checkpoint"]
    out = tmp_path / "e"
    with pytest.raises(ValueError, match="unknown split 'training'"):
        evaluate_in_process(out, f"ckpt_path={ckpt}", "split=training")
    with pytest.raises(ValueError, match="num_extremes"):
        evaluate_in_process(out, f"ckpt_path={ckpt}", "num_extremes=-1")
    with pytest.raises(ValueError, match="reuse_freed_memory must be true or false, got 1"):
        evaluate_in_process(out, f"ckpt_path={ckpt}", "reuse_freed_memory=1")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        evaluate_in_process(out, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        evaluate_in_process(out, f"ckpt_path={bad}")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not (BINARIZED_MNIST / "binarized_mnist" / "binarized_mnist_valid.amat").is_file(),
    reason="the binarized MNIST files are not on this machine",
)
def test_evaluate_command_on_binarized_mnist_validation(tmp_path):
    """About a minute: reads the 50000 training images once, evaluates all 10000 validation images."""
    metrics = train_tiny(
        tmp_path / "train",
        "data=binarized_mnist",
        f"data.data_dir={BINARIZED_MNIST}",
        "debug=fast",
        "test=false",
        "trainer.limit_val_batches=null",
    )
    _, run_dir, summary = evaluate_py(
        tmp_path, "val", metrics["checkpoint"], f"data_dir={BINARIZED_MNIST}", "batch_size=500"
    )
    assert summary["val/num_images"] == 10000
    assert summary["val/nll"] == pytest.approx(metrics["val/nll"], rel=1e-6)
    assert np.load(run_dir / "bits_map.npy").shape == (1, 28, 28)
