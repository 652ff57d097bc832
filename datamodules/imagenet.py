"""Downsampled ImageNet at 32x32 and 64x64 (the PixelRNN paper's ImageNet benchmarks; files of Chrabaszcz,
Loshchilov & Hutter 2017, "A Downsampled Variant of ImageNet"), K=256, C=3, 1000 classes.

The official npz files (image-net.org, Download, "Downsampled ImageNet"; an account is needed, so nothing is
downloaded here) are read from ``<data_dir>/Imagenet{s}_train_npz/train_data_batch_{1..10}.npz`` and
``<data_dir>/Imagenet{s}_val_npz/val_data.npz``: each holds ``data``, uint8 rows of 3*s*s values (the R
plane, then G, then B, each row-major), and ``labels`` in 1..1000 (stored here as 0..999).

The 64x64 training set is about 15 GB, so it is never loaded whole: ``prepare_data`` converts each split
once, streaming row chunks out of the zip members, into ``<cache>/{train,val}_images.npy`` (uint8
(N, 3, s, s)) and ``{train,val}_labels.npy`` (int64 (N,)); batches are then read image by image from
disk (:class:`MemmapImages`). A manifest (the source files' names, sizes and modification times) is
written last, after the arrays are renamed into place, so an interrupted or stale conversion is rebuilt
and a finished one is reused.

Splits: ``test`` is the official validation set (what the paper reports), ``val`` is ``val_size`` images
carved from the training set with a fixed seed (for checkpoint selection), ``train`` the rest.
"""

import json
import logging
import os
import zipfile

import numpy as np
import torch

from datamodules.base import ImageDataModule, MemmapImages, read_npy_header, temporary_file

log = logging.getLogger(__name__)

NUM_TRAIN_FILES = 10
SPLIT_SEED = 0  # fixed, so every run selects checkpoints on the same images
MANIFEST_VERSION = 1
CHUNK_BYTES = 64 << 20  # rows copied per read while converting: memory stays at this, whatever the file


def train_files() -> list[str]:
    return [f"train_data_batch_{i}.npz" for i in range(1, NUM_TRAIN_FILES + 1)]


def _npy_member(archive: zipfile.ZipFile, key: str, path: str):
    """The open member ``key``.npy of an npz archive and its (shape, dtype), read from its header only."""
    name = key + ".npy"
    if name not in archive.namelist():
        raise ValueError(f"{path} has no '{key}' array (it holds {', '.join(archive.namelist())})")
    member = archive.open(name)
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    if fortran:
        raise ValueError(
            f"{path}: '{key}' is stored in Fortran order, expected C order as the official files"
        )
    return member, shape, dtype


class SourceFile:
    """One official npz batch: its sizes are checked from the headers before any row is copied."""

    def __init__(self, path: str, image_size: int):
        self.path = path
        self.row_bytes = 3 * image_size * image_size
        try:
            with zipfile.ZipFile(path) as archive:
                member, shape, dtype = _npy_member(archive, "data", path)
                member.close()
                if dtype != np.uint8 or len(shape) != 2 or shape[1] != self.row_bytes:
                    raise ValueError(
                        f"{path}: 'data' is {dtype} {tuple(shape)}, expected uint8 (N, {self.row_bytes}) "
                        f"for {image_size}x{image_size} images: is this the {image_size}x{image_size} set?"
                    )
                self.count = int(shape[0])
                member, shape, dtype = _npy_member(archive, "labels", path)
                member.close()
                if dtype.kind not in "iu" or tuple(shape) != (self.count,):
                    raise ValueError(
                        f"{path}: 'labels' is {dtype} {tuple(shape)}, expected {self.count} integers"
                    )
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable npz file ({e})") from None

    def copy_into(self, out, labels: np.ndarray) -> None:
        """Appends this file's rows to the open file ``out`` and fills ``labels`` (count,) with 0..999."""
        try:
            with zipfile.ZipFile(self.path) as archive:
                member, _, _ = _npy_member(archive, "data", self.path)
                with member:
                    rows_per_chunk = max(1, CHUNK_BYTES // self.row_bytes)
                    left = self.count
                    while left:
                        want = min(left, rows_per_chunk) * self.row_bytes
                        chunk = member.read(want)
                        if len(chunk) != want:
                            raise ValueError(f"{self.path}: 'data' ends early")
                        out.write(chunk)
                        left -= want // self.row_bytes
                with archive.open("labels.npy") as member:
                    values = np.lib.format.read_array(member, allow_pickle=False)
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # a CRC error shows up here
            raise ValueError(f"{self.path} is corrupt ({e})") from None
        values = values.astype(np.int64)
        if len(values) and not 1 <= values.min() <= values.max() <= 1000:
            raise ValueError(
                f"{self.path}: labels span {values.min()}..{values.max()}, "
                "expected 1..1000 as in the official files"
            )
        labels[:] = values - 1


def describe(paths: list[str]) -> list[dict]:
    """What the manifest records of each source file: a change to any of them means a rebuild."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append({"name": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class _DownsampledImageNet(ImageDataModule):
    """Shared by the 32x32 and 64x64 sets; the subclasses set the size."""

    NUM_CHANNELS = 3
    NUM_LEVELS = 256
    NUM_CLASSES = 1000

    def __init__(
        self,
        data_dir: str,
        cache_dir: str | None,
        batch_size: int,
        num_workers: int,
        num_channels: int,
        num_levels: int,
        image_size: int,
        num_classes: int,
        val_size: int,
    ):
        super().__init__(batch_size, num_workers, num_channels, num_levels, image_size, num_classes)
        if val_size < 1:
            raise ValueError(f"data.val_size={val_size} must be at least 1")
        self.data_dir = os.path.expanduser(data_dir)
        s = self.IMAGE_SIZE
        self.train_folder = os.path.join(self.data_dir, f"Imagenet{s}_train_npz")
        self.val_folder = os.path.join(self.data_dir, f"Imagenet{s}_val_npz")
        default_cache = os.path.join(self.data_dir, f"Imagenet{s}_uint8")
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache
        self.val_size = val_size

    # The official files -> the cache

    def sources(self, split: str) -> list[str]:
        """The official files of ``split`` ("train": the ten batches, "official_val": val_data)."""
        if split == "train":
            return [os.path.join(self.train_folder, n) for n in train_files()]
        return [os.path.join(self.val_folder, "val_data.npz")]

    def check_sources(self) -> None:
        missing = {}
        for split in ("train", "official_val"):
            for path in self.sources(split):
                if not os.path.isfile(path):
                    missing.setdefault(os.path.dirname(path), []).append(os.path.basename(path))
        if missing:
            where = "; ".join(f"put {', '.join(names)} in {folder}" for folder, names in missing.items())
            raise FileNotFoundError(
                f"{self.name} not found: {where} (download Imagenet{self.IMAGE_SIZE}_train and _val "
                f"(npz format) from https://image-net.org/download-images, 'Downsampled ImageNet', and unzip "
                f"them into {self.data_dir})"
            )

    def cache_path(self, split: str, what: str) -> str:
        return os.path.join(self.cache_dir, f"{split}_{what}")

    def manifest(self, split: str) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "image_size": self.IMAGE_SIZE,
            "sources": describe(self.sources(split)),
        }

    def is_converted(self, split: str) -> bool:
        try:
            with open(self.cache_path(split, "manifest.json")) as f:
                stored = json.load(f)
            if stored.get("manifest") != self.manifest(split):
                return False
            s = self.IMAGE_SIZE
            shape, _ = read_npy_header(self.cache_path(split, "images.npy"), np.uint8, ndim=4)
            labels_shape, _ = read_npy_header(self.cache_path(split, "labels.npy"), np.int64, ndim=1)
            return shape == (stored["count"], 3, s, s) and labels_shape == (stored["count"],)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False

    def convert(self, split: str) -> None:
        """Writes the split's images and labels into the cache, atomically, from the official files."""
        # Every header first: a wrong or broken file fails before anything is written.
        files = [SourceFile(path, self.IMAGE_SIZE) for path in self.sources(split)]
        try:
            self._write_cache(split, files)
        except OSError as e:
            raise OSError(
                f"{self.name}: could not write the converted {split} split into {self.cache_dir} ({e}); it "
                f"needs {sum(f.count for f in files) * files[0].row_bytes / 1e9:.1f} GB: free space there "
                "or set data.cache_dir=<a writable folder>"
            ) from None

    def _write_cache(self, split: str, files: list[SourceFile]) -> None:
        count = sum(f.count for f in files)
        s = self.IMAGE_SIZE
        os.makedirs(self.cache_dir, exist_ok=True)
        manifest_path = self.cache_path(split, "manifest.json")
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # from here until the new one is written, the cache counts as absent
        log.info("%s: converting %d %s images into %s (once)", self.name, count, split, self.cache_dir)
        temporary = []
        try:
            fd, images_tmp = temporary_file(self.cache_dir, f".{split}_images-", suffix=".npy")
            temporary.append(images_tmp)
            labels = np.empty(count, dtype=np.int64)
            with os.fdopen(fd, "wb") as out:
                header = {"descr": "|u1", "fortran_order": False, "shape": (count, 3, s, s)}
                np.lib.format.write_array_header_2_0(out, header)
                start = 0
                for source in files:
                    source.copy_into(out, labels[start : start + source.count])
                    start += source.count
                out.flush()
                os.fsync(out.fileno())
            fd, labels_tmp = temporary_file(self.cache_dir, f".{split}_labels-", suffix=".npy")
            temporary.append(labels_tmp)
            with os.fdopen(fd, "wb") as out:
                np.save(out, labels)
            os.replace(images_tmp, self.cache_path(split, "images.npy"))
            os.replace(labels_tmp, self.cache_path(split, "labels.npy"))
            fd, manifest_tmp = temporary_file(self.cache_dir, f".{split}_manifest-")
            temporary.append(manifest_tmp)
            with os.fdopen(fd, "w") as out:
                json.dump({"manifest": self.manifest(split), "count": count}, out)
            os.replace(manifest_tmp, manifest_path)
        finally:
            for path in temporary:
                if os.path.exists(path):
                    os.remove(path)

    def prepare_data(self) -> None:
        self.check_sources()
        for split in ("train", "official_val"):
            if not self.is_converted(split):
                self.convert(split)

    # The cache -> splits

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op once converted; sample.py and single processes need no separate call
        if stage in ("fit", "validate", None) and "val" not in self.splits:
            path = self.cache_path("train", "images.npy")
            labels = self.check_labels(
                "train", self._labels("train"), read_npy_header(path, np.uint8, 4)[0][0], path
            )
            if not self.val_size < len(labels):
                raise ValueError(
                    f"data.val_size={self.val_size} must be below the {len(labels)} training images"
                )
            order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
            # Sorted, so each split reads the file front to back when not shuffled.
            for split, rows in (("train", order[self.val_size :]), ("val", order[: self.val_size])):
                rows = np.sort(rows)
                self.labels[split] = labels[torch.from_numpy(rows)]
                self.splits[split] = MemmapImages(path, rows, self.labels[split])
        if stage in ("test", None) and "test" not in self.splits:
            path = self.cache_path("official_val", "images.npy")
            images = MemmapImages(path)
            self.labels["test"] = self.check_labels("test", self._labels("official_val"), len(images), path)
            images.labels = self.labels["test"]
            self.splits["test"] = images

    def _labels(self, split: str) -> torch.Tensor:
        path = self.cache_path(split, "labels.npy")
        return torch.from_numpy(np.load(path, allow_pickle=False))


class ImageNet32DataModule(_DownsampledImageNet):
    """Downsampled ImageNet 32x32: 1281167 training images (minus ``val_size``) and the official 50000."""

    name = "ImageNet 32x32"
    IMAGE_SIZE = 32

    def __init__(
        self,
        data_dir: str = "data",
        cache_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        num_channels: int = 3,
        num_levels: int = 256,
        image_size: int = 32,
        num_classes: int = 1000,
        val_size: int = 10000,
    ):
        super().__init__(
            data_dir,
            cache_dir,
            batch_size,
            num_workers,
            num_channels,
            num_levels,
            image_size,
            num_classes,
            val_size,
        )


class ImageNet64DataModule(_DownsampledImageNet):
    """Downsampled ImageNet 64x64: as the 32x32 set, at 64x64 (about 15 GB of training images)."""

    name = "ImageNet 64x64"
    IMAGE_SIZE = 64

    def __init__(
        self,
        data_dir: str = "data",
        cache_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        num_channels: int = 3,
        num_levels: int = 256,
        image_size: int = 64,
        num_classes: int = 1000,
        val_size: int = 10000,
    ):
        super().__init__(
            data_dir,
            cache_dir,
            batch_size,
            num_workers,
            num_channels,
            num_levels,
            image_size,
            num_classes,
            val_size,
        )
