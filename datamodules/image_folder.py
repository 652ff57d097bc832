"""Your own images: a folder of PNG / JPEG files as K-level images (K = ``num_levels``) of a chosen size.

``path`` holds either image files (one unlabelled set, ``num_classes`` 0) or subfolders of them (one class
per subfolder, labels 0.. in sorted name order; images anywhere below a class folder belong to it), not
both. Names starting with "." are ignored. Each image is read once: EXIF orientation applied, converted to
grey (``num_channels`` 1) or RGB (3; transparency dropped), centre-cropped to a square, resized to
``image_size`` (box filter when shrinking, bicubic when enlarging) and quantized: level = floor(v * K /
256) for 8-bit values v, so K=256 keeps the values and K=8 keeps the top 3 bits; K=2 uses ``threshold``
(level 1 where v / 255 >= threshold).

The result is cached as one uint8 .npz (levels, labels, and a manifest of the source files' names, sizes
and modification times plus these settings), written to a temporary file and renamed into place. The
cache is rebuilt when the manifest differs from the folder and reused when it does not. It lies in
``<path>/.pixel_models_cache/`` when that folder can be written, else in ``cache_dir``.

Files that cannot be read are listed and skipped (``strict=true``: refused). The images are split once,
with a fixed seed, into train / val / test by ``val_fraction`` and ``test_fraction`` (at least one image in
each split with a non-zero fraction); a changed set of files gives a different split.
"""

import hashlib
import json
import logging
import math
import os
import zipfile

import numpy as np
import torch
from PIL import Image, ImageOps

from datamodules.base import ImageDataModule, temporary_file

log = logging.getLogger(__name__)

EXTENSIONS = (".png", ".jpg", ".jpeg")
CACHE_FOLDER = ".pixel_models_cache"
MANIFEST_VERSION = 1
SPLIT_SEED = 0  # fixed, so every run trains, validates and tests on the same images
SHOWN = 10  # unreadable files named in a message; the count covers the rest


def quantize(values: np.ndarray, num_levels: int, threshold: float) -> np.ndarray:
    """8-bit values -> levels 0..K-1 (uint8), as the module docstring says."""
    if num_levels == 2:
        return (values.astype(np.float64) / 255.0 >= threshold).astype(np.uint8)
    return (values.astype(np.uint16) * num_levels // 256).astype(np.uint8)


def load_image(path: str, size: int, channels: int) -> np.ndarray:
    """One file as uint8 (C, size, size): oriented, grey or RGB, centre-cropped square, resized."""
    with Image.open(path) as image:
        image.draft("L" if channels == 1 else "RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale
        image = ImageOps.exif_transpose(image)
        image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC
    array = np.asarray(image.resize((size, size), resample), dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def writable(folder: str) -> bool:
    # Root ignores permission bits: a folder nobody may write is still left untouched.
    return os.access(folder, os.W_OK) and os.stat(folder).st_mode & 0o222 != 0


class ImageFolderDataModule(ImageDataModule):
    """Train / val / test from a folder of images; the declared facts are the user's choices."""

    name = "image folder"

    def __init__(
        self,
        path: str | None = None,
        image_size: int = 32,
        num_channels: int = 3,
        num_levels: int = 256,
        num_classes: int = 0,
        threshold: float = 0.5,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        strict: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
    ):
        if not path:
            raise ValueError("data.path is not set: data.path=<a folder of PNG / JPEG images>")
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"data.path={path}: no such folder")
        self.name = f"the image folder {self.path}"
        if num_channels not in (1, 3):
            raise ValueError(f"data.num_channels={num_channels} must be 1 (grey) or 3 (RGB)")
        if not 2 <= num_levels <= 256:
            raise ValueError(f"data.num_levels={num_levels} must be between 2 and 256")
        if image_size < 2:
            raise ValueError(f"data.image_size={image_size} must be at least 2")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"data.threshold={threshold} must be between 0 and 1 (exclusive)")
        if not (
            0.0 < val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0
        ):
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction}: need "
                "0 < val_fraction, 0 <= test_fraction, and their sum below 1"
            )
        self.files, self.classes = self.scan()
        self.NUM_CHANNELS, self.NUM_LEVELS, self.IMAGE_SIZE = num_channels, num_levels, image_size
        self.NUM_CLASSES = len(self.classes)
        if num_classes != self.NUM_CLASSES:
            found = f"class subfolders {', '.join(self.classes)}" if self.classes else "no class subfolders"
            raise ValueError(
                f"data.num_classes={num_classes} does not match {self.path} ({found}): "
                f"set data.num_classes={self.NUM_CLASSES}"
            )
        super().__init__(batch_size, num_workers, num_channels, num_levels, image_size, num_classes)
        self.threshold = float(threshold) if num_levels == 2 else None  # only binarizing uses it
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.strict = strict
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else None
        self.split_sizes()  # a folder too small to split fails here, before anything is decoded

    # Which files, and where the cache goes

    def scan(self) -> tuple[list[tuple[str, int]], list[str]]:
        """Sorted (relative name, label) of every image file, and the class names (none for a flat folder)."""

        def images_below(folder: str) -> list[str]:
            found = []
            for root, dirs, names in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    os.path.relpath(os.path.join(root, n), self.path)
                    for n in names
                    if not n.startswith(".") and n.lower().endswith(EXTENSIONS)
                ]
            return sorted(found)

        entries = sorted(e for e in os.listdir(self.path) if not e.startswith("."))
        top = [
            e
            for e in entries
            if e.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(self.path, e))
        ]
        folders = [e for e in entries if os.path.isdir(os.path.join(self.path, e))]
        by_class = {f: images_below(os.path.join(self.path, f)) for f in folders}
        classes = [f for f in folders if by_class[f]]
        if top and classes:
            raise ValueError(
                f"{self.path} holds both image files ({top[0]}, ...) and class subfolders "
                f"({classes[0]}, ...): put every image in a class subfolder (labelled) or none (unlabelled)"
            )
        if not top and not classes:
            raise ValueError(
                f"{self.path} holds no PNG or JPEG images (looked for {', '.join(EXTENSIONS)} files at the "
                "top level and in subfolders)"
            )
        if top:
            return [(name, -1) for name in top], []
        return [(name, label) for label, c in enumerate(classes) for name in by_class[c]], classes

    def cache_file(self) -> str:
        settings = f"s{self.image_size}-c{self.num_channels}-k{self.num_levels}.npz"
        if self.cache_dir is None:
            folder = os.path.join(self.path, CACHE_FOLDER)
            if (os.path.isdir(folder) and writable(folder)) or (
                not os.path.exists(folder) and writable(self.path)
            ):
                return os.path.join(folder, settings)
            raise PermissionError(
                f"{self.path} is not writable, so its converted images cannot be cached there: "
                "set data.cache_dir=<a writable folder>"
            )
        # Many folders may share one cache_dir: the folder's name and a hash of its full path keep them apart.
        tag = hashlib.sha1(self.path.encode()).hexdigest()[:10]
        return os.path.join(self.cache_dir, f"{os.path.basename(self.path)}-{tag}-{settings}")

    def manifest(self) -> dict:
        files = []
        for name, label in self.files:
            st = os.stat(os.path.join(self.path, name))
            files.append([name, label, st.st_size, st.st_mtime_ns])
        return {
            "version": MANIFEST_VERSION,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "num_levels": self.num_levels,
            "threshold": self.threshold,
            "classes": self.classes,
            "files": files,
        }

    # Building and reading the cache

    def read_cache(self, path: str, manifest: dict) -> tuple[np.ndarray, np.ndarray, list] | None:
        """(levels, labels, skipped) from the cache if it was built from exactly these files, else None."""
        try:
            with np.load(path, allow_pickle=False) as cache:
                stored = json.loads(cache["manifest"].tobytes().decode())
                if stored.get("source") != manifest:
                    return None
                levels, labels = cache["levels"], cache["labels"]
            c, s = self.num_channels, self.image_size
            if levels.dtype != np.uint8 or levels.shape[1:] != (c, s, s) or labels.shape != (len(levels),):
                return None
            if len(levels) and int(levels.max()) >= self.num_levels:
                return None
            return levels, labels.astype(np.int64), stored["skipped"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile):
            return None  # missing, truncated or foreign: rebuilt

    def build_cache(self, path: str, manifest: dict) -> tuple[np.ndarray, np.ndarray, list]:
        log.info("%s: converting %d images (once; cached in %s)", self.path, len(self.files), path)
        s, c = self.image_size, self.num_channels
        levels = np.empty((len(self.files), c, s, s), dtype=np.uint8)
        labels = np.empty(len(self.files), dtype=np.int64)
        kept, skipped = 0, []
        for name, label in self.files:
            try:
                values = load_image(os.path.join(self.path, name), s, c)
            except Exception as e:  # noqa: BLE001 (any decoder error: the file is listed and skipped)
                skipped.append([name, " ".join(str(e).split()) or type(e).__name__])
                continue
            levels[kept] = quantize(values, self.num_levels, self.threshold or 0.5)
            labels[kept] = label
            kept += 1
        levels, labels = levels[:kept], labels[:kept]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        record = json.dumps({"source": manifest, "skipped": skipped}).encode()
        fd, tmp = temporary_file(os.path.dirname(path), ".building-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, levels=levels, labels=labels, manifest=np.frombuffer(record, dtype=np.uint8))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return levels, labels, skipped

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """All readable images (N, C, s, s) and labels (N,), from the cache or by building it."""
        path = self.cache_file()
        manifest = self.manifest()
        cached = self.read_cache(path, manifest)
        levels, labels, skipped = cached if cached is not None else self.build_cache(path, manifest)
        if skipped:
            listed = "; ".join(f"{name} ({why})" for name, why in skipped[:SHOWN])
            more = f"; and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
            message = (
                f"{len(skipped)} of {len(self.files)} files in {self.path} are unreadable: {listed}{more}"
            )
            if self.strict:
                raise ValueError(
                    f"{message} (data.strict=true: fix or remove them, or set data.strict=false)"
                )
            log.warning("%s: skipped", message)
        return levels, labels

    def split_sizes(self, count: int | None = None) -> tuple[int, int, int]:
        count = len(self.files) if count is None else count
        num_val = max(1, math.floor(self.val_fraction * count + 0.5))
        num_test = max(1, math.floor(self.test_fraction * count + 0.5)) if self.test_fraction > 0 else 0
        num_train = count - num_val - num_test
        if num_train < 1:
            raise ValueError(
                f"{self.path}: {count} readable images are too few to split into train / val"
                f"{' / test' if num_test else ''} (val_fraction={self.val_fraction}, "
                f"test_fraction={self.test_fraction}): add images (at least {num_val + num_test + 1})"
            )
        return num_train, num_val, num_test

    def prepare_data(self) -> None:
        self.load()

    def has_test_split(self) -> bool:
        return self.test_fraction > 0

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        levels, labels = self.load()
        num_train, num_val, _ = self.split_sizes(len(levels))
        order = np.random.default_rng(SPLIT_SEED).permutation(len(levels))
        parts = np.split(order, [num_train, num_train + num_val])
        levels, labels = torch.from_numpy(levels), torch.from_numpy(labels)
        for split, rows in zip(("train", "val", "test"), parts, strict=True):
            if split == "test" and not self.has_test_split():
                continue
            rows = torch.from_numpy(np.sort(rows))
            self.splits[split] = self.check_levels(split, levels[rows], self.path)
            if self.num_classes:
                self.labels[split] = self.check_labels(split, labels[rows], len(rows), self.path)
