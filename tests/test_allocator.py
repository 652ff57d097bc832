"""``reuse_freed_memory``: glibc keeps freed blocks, so the next step does not fault them in again."""

import platform
import subprocess
import sys

import pytest

from pixel_models.training import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Ten "steps" that each allocate, touch and free 8 MiB tensors (the size of a step's largest activations
# here), counting the minor page faults of the last eight.
STEPS = """
import resource, sys, torch
from pixel_models.training.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    print(reuse_freed_memory(), file=sys.stderr)
def step():
    blocks = [torch.ones(2 << 20) for _ in range(4)]
    return sum(float(b[-1]) for b in blocks)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, env: dict | None = None) -> int:
    run = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, reused = page_faults("default"), page_faults("reuse")
    # 8 steps x 32 MiB touched: ~65,000 faults of 4 KiB pages when every block is mapped afresh.
    assert default > 10_000, default
    assert reused < default / 10, (default, reused)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_users_own_allocator_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert "left as it is" in allocator.reuse_freed_memory()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=100000")
    assert "GLIBC_TUNABLES" in allocator.reuse_freed_memory()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "preloaded" in allocator.reuse_freed_memory()


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert allocator.reuse_freed_memory().startswith("not glibc")
