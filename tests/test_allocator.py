"""``reuse_freed_memory``: glibc keeps freed blocks, so the next step does not fault them in again."""

import platform
import subprocess
import sys

import pytest

from pixel_models.training import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Eight "steps" that each allocate, touch and free two 40 MiB tensors (a step of the paper's CIFAR-10
# networks frees blocks of ~100 MiB), counting the minor page faults of each of the last six. Blocks
# above 32 MiB are mapped afresh on every allocation with glibc's defaults, whatever ran before; smaller
# ones only sometimes, depending on the process's history (glibc adapts its thresholds to what was freed).
STEPS = """
import resource, sys, torch
from pixel_models.training.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    print(reuse_freed_memory(), file=sys.stderr)
def step():
    blocks = [torch.ones(10 << 20) for _ in range(2)]
    return sum(float(b[-1]) for b in blocks)
step(); step()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def page_faults(mode: str) -> list[int]:
    """The minor page faults of each measured step."""
    run = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in run.stdout.split()]


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, reused = page_faults("default"), page_faults("reuse")
    # 80 MiB touched per step: ~20,000 faults of 4 KiB pages when its blocks are mapped afresh.
    assert all(n > 15_000 for n in default), default
    # Reused: none, except where the heap had to grow somewhere new once (seen: one step's worth, once).
    assert sum(n < 200 for n in reused) >= 5, reused


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
