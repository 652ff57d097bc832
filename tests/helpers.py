"""Shared by the tests that run train.py: the repository root, Hydra composition, a one-thread env."""

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

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
