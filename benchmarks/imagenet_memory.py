"""Peak resident memory of data=imagenet64: converting the official npz files and iterating one epoch.

Writes a synthetic downsampled-ImageNet 64x64 set in the official layout (ten ``train_data_batch_i.npz`` and
``val_data.npz``, random pixels) into ``--dir``, then, each in a fresh process so that each peak is its
own: the conversion into the on-disk uint8 cache (``prepare_data``), and one training epoch through
``train_dataloader()`` (shuffled, every image read) with 0 and with ``--workers`` DataLoader workers. One JSON
line per case: images, bytes of images, seconds, and peak RSS (``getrusage`` ru_maxrss) of the main process
and, separately, of its largest worker. ``--baseline`` lines give the peak of a process that only imports
the same modules, for comparison.

    python benchmarks/imagenet_memory.py --dir /tmp/imagenet64 --images-per-file 24000   # ~3 GB of images
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SIZE = 64


def peak_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def write_files(folder: str, per_file: int, val_images: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "Imagenet64_train_npz"), exist_ok=True)
    os.makedirs(os.path.join(folder, "Imagenet64_val_npz"), exist_ok=True)
    jobs = [(f"Imagenet64_train_npz/train_data_batch_{i}.npz", per_file) for i in range(1, 11)]
    for name, count in [*jobs, ("Imagenet64_val_npz/val_data.npz", val_images)]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            continue
        data = rng.integers(0, 256, size=(count, 3 * SIZE * SIZE), dtype=np.uint8)
        np.savez(path + ".tmp.npz", data=data, labels=rng.integers(1, 1001, size=count))
        os.replace(path + ".tmp.npz", path)


def child(case: str, folder: str, workers: int, batch_size: int) -> dict:
    import torch.utils.data  # noqa: F401  (what the cases import anyway, for the baseline)

    from datamodules import ImageNet64DataModule

    dm = ImageNet64DataModule(data_dir=folder, batch_size=batch_size, num_workers=workers, val_size=1000)
    start = time.perf_counter()
    out = {"case": case, "workers": workers}
    if case == "baseline":
        pass
    elif case == "convert":
        shutil.rmtree(dm.cache_dir, ignore_errors=True)  # measure a conversion, not a reuse
        start = time.perf_counter()
        dm.prepare_data()
        out["images"] = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in _cache_files(dm))
    elif case == "epoch":
        dm.setup("fit")
        images, checksum = 0, 0
        for batch in dm.train_dataloader():
            images += len(batch["levels"])
            checksum += int(batch["levels"][:, :, 0, 0].sum())  # touch the data
        out["images"] = images
    out["seconds"] = round(time.perf_counter() - start, 2)
    if "images" in out:
        out["image_bytes"] = out["images"] * 3 * SIZE * SIZE
    out["peak_rss_mib"] = round(peak_mib(), 1)
    out["peak_rss_worker_mib"] = round(peak_mib(resource.RUSAGE_CHILDREN), 1) if workers else None
    return out


def _cache_files(dm) -> list[str]:
    return [dm.cache_path(split, "images.npy") for split in ("train", "official_val")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True)
    parser.add_argument("--images-per-file", type=int, default=24000)
    parser.add_argument("--val-images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, workers = args.child
        print(json.dumps(child(case, args.dir, int(workers), args.batch_size)), flush=True)
        return

    write_files(args.dir, args.images_per_file, args.val_images)
    base = [sys.executable, __file__, "--dir", args.dir, "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cases = [("baseline", 0), ("convert", 0), ("epoch", 0), ("epoch", args.workers)]
    for case, workers in cases:
        result = subprocess.run(
            [*base, "--child", case, str(workers)], env=env, capture_output=True, text=True
        )
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        line = json.loads(result.stdout.strip().splitlines()[-1])
        line["source_bytes"] = sum(
            os.path.getsize(os.path.join(d, f))
            for d in (
                os.path.join(args.dir, "Imagenet64_train_npz"),
                os.path.join(args.dir, "Imagenet64_val_npz"),
            )
            for f in os.listdir(d)
        )
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
