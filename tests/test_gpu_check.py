"""benchmarks/gpu_check.py on a machine without a GPU: it must refuse at once, saying why."""

import os
import subprocess
import sys
import time

from helpers import ROOT


def test_gpu_check_refuses_at_once_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no CUDA GPU is available" in result.stderr
    assert result.stdout == ""  # no case started
    assert time.monotonic() - start < 60  # imports torch and stops: nothing is built or timed
