"""Keep the C heap's freed memory in the process between training steps (glibc only).

PyTorch's CPU tensors come from the C allocator (``malloc``). With glibc's defaults, the large
activations of a training step are returned to the operating system when freed (the top of the heap is
trimmed, the largest blocks are unmapped), so the next step takes them back page by page: thousands of
page faults per step on this project's MNIST networks, time the kernel spends zeroing pages (3-30% of a
CPU training step, most at K=256; ``benchmarks/train_throughput.py`` measures it). Raising glibc's mmap
and trim thresholds keeps that memory in the heap for the next step. This is what PyTorch's CPU tuning
guides get from replacing the allocator (jemalloc, tcmalloc); here it is two ``mallopt`` calls and no
new dependency. The cost: the process holds on to its peak memory until it exits instead of handing part
of it back between steps.

``train.py`` calls ``reuse_freed_memory()`` at start-up unless ``reuse_freed_memory=false``, and
``evaluate.py`` and ``sample.py`` once their settings and the checkpoint are checked (inference frees
each batch's activations too). It does
nothing (and says so) where the C library is not glibc, and where the user has already tuned glibc's
allocator through its environment variables (those win) or preloads another allocator.
"""

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Up to 1 GiB per block from the heap, and up to 2 GiB of free heap kept: a step of the paper's CIFAR-10
# networks allocates blocks of ~100 MiB, above glibc's largest automatic threshold (32 MiB).
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def reuse_freed_memory() -> str:
    """Set glibc's thresholds (see the module docstring); returns what was done, one line for the log."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"the C allocator is preloaded ({preloaded}): its own settings apply"
    tuned = [name for name in USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return f"glibc's allocator is tuned by {', '.join(tuned)}: left as it is"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: the C allocator's settings are left as they are"
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
            M_TRIM_THRESHOLD, TRIM_THRESHOLD
        )
    except (OSError, AttributeError):
        done = 0
    if not done:
        return "glibc refused mallopt: the C allocator's settings are left as they are"
    return "glibc keeps freed memory for reuse (mmap and trim thresholds raised)"
