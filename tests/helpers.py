"""Shared by several test files: for the tests that run train.py, the repository root, Hydra
composition, a one-thread env and override lists; for the cached samplers' tests, the step-by-step
comparison with the naive sampler; for the recurrent layers' per-pixel references, the colour mask of
their output convolution."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from pixel_models.sampling.generate import NaiveStepper, step_logits

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses: tiny runs gain nothing from a second intra-op thread, and on a busy machine lose a lot.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(
    script: str, *args: str, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from the repository root, one thread; with ``check``, it must succeed."""
    result = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def compose_train(*overrides: str, hydra_config: bool = False):
    """conf/train.yaml composed with ``overrides``, as `python train.py <overrides>` would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_config)


# A tiny, quiet training run: no progress output, no sampling, a narrow network.
TINY_RUN = [
    "trainer=cpu",
    "callbacks.progress_bar=null",
    "callbacks.sample_grid=null",
    "callbacks.completion_grid=null",
    "callbacks.model_summary=null",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "final_samples=0",
    "model.net.hidden=8",
]

# A sample grid and a completion grid every epoch, logged through the run's logger.
GRIDS_EVERY_EPOCH = [
    "+callbacks.sample_grid._target_=pixel_models.training.callbacks.SampleGrid",
    "+callbacks.sample_grid.every_n_epochs=1",
    "+callbacks.sample_grid.num_samples=4",
    "+callbacks.completion_grid._target_=pixel_models.training.callbacks.CompletionGrid",
    "+callbacks.completion_grid.every_n_epochs=1",
    "+callbacks.completion_grid.num_images=2",
    "+callbacks.completion_grid.completions_per_image=1",
]


def worst_step_difference(
    net: torch.nn.Module, image: torch.Tensor, label: torch.Tensor | None = None, stepper=None
) -> float:
    """Walk the sub-pixels of ``image`` in raster order, filling it in as generate does (later sub-pixels
    zero), and return the largest difference between cached and naive logits over all steps. ``stepper``:
    the cached stepper to use (default: a new ``net.cached_stepper(label)``)."""
    _, channels, height, width = image.shape
    x = torch.zeros_like(image)
    cached = net.cached_stepper(label) if stepper is None else stepper
    naive = NaiveStepper(net, label)
    worst = 0.0
    with torch.no_grad():
        for i in range(height):
            for j in range(width):
                for c in range(channels):
                    expected = step_logits(net, naive, x, i, j, c)
                    worst = max(worst, (step_logits(net, cached, x, i, j, c) - expected).abs().max().item())
                    x[:, c, i, j] = image[:, c, i, j]
    return worst


def output_colour_mask(weight: torch.Tensor, num_colors: int) -> torch.Tensor:
    """The mask of a recurrent layer's 1x1 output convolution ``weight`` (out, in), rebuilt entry by entry:
    output feature q may read input feature f only if q's colour group (q % C) is f's or a later one."""
    mask = torch.zeros_like(weight)
    for q in range(weight.shape[0]):
        for f in range(weight.shape[1]):
            mask[q, f] = float(q % num_colors >= f % num_colors)
    return mask
