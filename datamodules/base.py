"""What every data module shares: declared facts, the dict batches, and atomic downloads.

A split is either held whole in memory as a uint8 tensor (N, C, H, W) of levels in {0..K-1}, or, for data
too large for memory (downsampled ImageNet 64x64), a :class:`MemmapImages` dataset that reads each image
from a uint8 .npy file on disk. A batch is a dict: ``levels`` (B, C, H, W) uint8, ``index`` (B,) int64,
the position of each image within its split, and, for data with classes, ``label`` (B,) int64 in
{0..num_classes-1}.
"""

import os
import shutil
import tempfile
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class IndexedImages(Dataset):
    """Item i is ``{"levels": levels[i], "index": i}`` (and ``"label": labels[i]`` when there are labels): the
    index lets the model sum exact per-image NLL over a split."""

    def __init__(self, levels: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is not None and len(labels) != len(levels):
            raise ValueError(f"{len(labels)} labels for {len(levels)} images")
        self.levels = levels
        self.labels = labels

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> dict:
        item = {"levels": self.levels[i], "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item


class MemmapImages(Dataset):
    """Item i is image ``rows[i]`` of a uint8 .npy file of shape (N, C, H, W), read from disk when asked for,
    as a dict like :class:`IndexedImages` gives (``index`` is i, the position within this split).

    Each item is one positioned read (``os.pread``) rather than a view of a memory map: pages of a map
    that a worker has touched count towards its resident memory until the kernel needs them back, so
    iterating a 15 GB file through a map shows a resident size of 15 GB; reads keep it at a few batches.
    A slice (``split[:n]``) gives the levels of those images as one uint8 tensor, as slicing an in-memory
    split does. The file descriptor is opened lazily in each process, so the dataset works in DataLoader
    workers (forked or spawned).
    """

    def __init__(self, path: str, rows: np.ndarray | None = None, labels: torch.Tensor | None = None):
        self.path = path
        self.shape, self.offset = read_npy_header(path, np.uint8, ndim=4)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        size = self.shape[0] if self.rows is None else len(self.rows)
        if (
            self.rows is not None
            and len(self.rows)
            and not 0 <= self.rows.min() <= self.rows.max() < self.shape[0]
        ):
            raise ValueError(f"{path}: rows outside 0..{self.shape[0] - 1}")
        if labels is not None and len(labels) != size:
            raise ValueError(f"{len(labels)} labels for {size} images")
        self.labels = labels
        self.item_shape = tuple(self.shape[1:])
        self.item_bytes = int(np.prod(self.item_shape))
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.shape[0] if self.rows is None else len(self.rows)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, i: int) -> torch.Tensor:
        row = i if self.rows is None else int(self.rows[i])
        data = os.pread(self._file(), self.item_bytes, self.offset + row * self.item_bytes)
        if len(data) != self.item_bytes:
            raise OSError(f"{self.path} is truncated: image {row} is incomplete; delete it to rebuild it")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.item_shape)

    def __getitem__(self, i: int | slice) -> dict | torch.Tensor:
        if isinstance(i, slice):
            # As slicing an in-memory split gives: the levels of those images, one uint8 tensor (n, C, H, W).
            rows = range(*i.indices(len(self)))
            return (
                torch.stack([self.read(r) for r in rows])
                if rows
                else torch.empty((0, *self.item_shape), dtype=torch.uint8)
            )
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} of {len(self)}")
        item = {"levels": self.read(i), "index": i}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def __getstate__(self) -> dict:  # spawned workers: a descriptor does not travel
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)


def read_npy_header(path: str, dtype, ndim: int) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of a C-ordered .npy file of ``dtype`` and ``ndim`` dimensions whose size on disk
    matches its header; anything else raises ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, found = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, found = np.lib.format.read_array_header_2_0(f)
        except Exception as e:
            raise ValueError(f"{path} is not a .npy file ({e})") from None
        offset = f.tell()
    if found != np.dtype(dtype) or fortran or len(shape) != ndim:
        raise ValueError(f"{path} holds {found} {shape}, expected {np.dtype(dtype)} with {ndim} dimensions")
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes, its header says {expected}")
    return tuple(int(n) for n in shape), offset


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses set the facts below and fill ``self.splits`` in ``setup``."""

    name = ""  # for messages, e.g. "binarized MNIST"
    NUM_CHANNELS = 0
    NUM_LEVELS = 0
    IMAGE_SIZE = 0
    NUM_CLASSES = 0  # data with classes sets it (and fills ``self.labels``)

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        num_channels: int,
        num_levels: int,
        image_size: int,
        num_classes: int = 0,
    ):
        super().__init__()
        # The config declares these so model configs can interpolate them; a wrong one must fail here,
        # not as a shape error deep inside the model.
        for key, declared, actual in (
            ("num_channels", num_channels, self.NUM_CHANNELS),
            ("num_levels", num_levels, self.NUM_LEVELS),
            ("image_size", image_size, self.IMAGE_SIZE),
            ("num_classes", num_classes, self.NUM_CLASSES),
        ):
            if declared != actual:
                raise ValueError(
                    f"data.{key}={declared} does not match {self.name} ({key}={actual}): "
                    f"set data.{key}={actual}"
                )
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be 0 or more")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.image_size = image_size
        self.num_classes = num_classes
        # Per split: a uint8 tensor (N, C, H, W), or a dataset of dict items (MemmapImages) for data that
        # stays on disk.
        self.splits: dict[str, torch.Tensor | Dataset] = {}
        # Per split, the class of each image (int64 (N,)), for data with classes (``num_classes`` > 0).
        self.labels: dict[str, torch.Tensor] = {}

    def has_test_split(self) -> bool:
        return True

    def dataset(self, split: str) -> Dataset:
        """The split as a dataset of dict items."""
        if split not in self.splits:
            raise RuntimeError(f"{self.name}: the {split} split is not loaded; call setup() first")
        data = self.splits[split]
        return IndexedImages(data, self.labels.get(split)) if isinstance(data, torch.Tensor) else data

    def head(self, split: str, count: int) -> dict:
        """The first ``count`` images of ``split`` as one batch dict (``levels`` uint8 (n, C, H, W),
        ``index``, and ``label`` where there are classes), whichever way the split is stored."""
        dataset = self.dataset(split)
        return default_collate([dataset[i] for i in range(min(count, len(dataset)))])

    def check_levels(self, split: str, levels: torch.Tensor, source: str) -> torch.Tensor:
        """``levels`` if uint8 (N, C, H, W) with values below K, else raises naming ``source``."""
        c, s = self.num_channels, self.image_size
        if levels.dim() != 4 or tuple(levels.shape[1:]) != (c, s, s):
            raise ValueError(
                f"{source}: {split} images have shape {tuple(levels.shape)}, expected (N, {c}, {s}, {s})"
            )
        if levels.dtype != torch.uint8:
            raise ValueError(f"{source}: {split} images are {levels.dtype}, expected torch.uint8")
        if len(levels) and int(levels.max()) >= self.num_levels:
            raise ValueError(
                f"{source}: {split} images hold level {int(levels.max())}, expected 0..{self.num_levels - 1}"
            )
        return levels

    def check_labels(self, split: str, labels: torch.Tensor, count: int, source: str) -> torch.Tensor:
        """``labels`` as int64 (count,) with values in 0..num_classes-1, else raises naming ``source``."""
        if labels.dim() != 1 or len(labels) != count:
            raise ValueError(
                f"{source}: {split} has labels of shape {tuple(labels.shape)} for {count} images"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{source}: {split} labels are {labels.dtype}, expected integers")
        labels = labels.to(torch.int64)
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(
                f"{source}: {split} labels span {int(labels.min())}..{int(labels.max())}, "
                f"expected 0..{self.num_classes - 1}"
            )
        return labels

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def temporary_file(folder: str, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` (so the final rename stays on one file system), with the
    permissions ``open`` would give (mkstemp's are owner-only): a shared cache stays readable by others."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, path


def fetch_atomically(
    target_dir: str, names: list[str], fetch: Callable[[str], str], what: str, alternative: str = ""
) -> None:
    """Puts the missing files ``names`` into ``target_dir``, all or nothing.

    ``fetch(tmp)`` downloads into ``tmp`` (a fresh folder inside ``target_dir``, so the final rename stays
    on one file system) and returns the folder where the files now lie. On any failure, everything this
    call created is removed and one FileNotFoundError says which files to put where (or ``alternative``).
    """
    missing = [n for n in names if not os.path.isfile(os.path.join(target_dir, n))]
    if not missing:
        return
    # The topmost folder we are about to create: removing it on failure leaves the tree as we found it.
    created = None
    d = os.path.abspath(target_dir)
    while not os.path.exists(d):
        created, d = d, os.path.dirname(d)
    tmp = None
    try:
        # Root ignores permission bits; a folder that nobody may write (a shared, read-only data set) is
        # still meant to stay untouched, so refuse before creating anything in it.
        if not os.access(d, os.W_OK) or os.stat(d).st_mode & 0o222 == 0:
            raise PermissionError(f"{d} is read-only")
        os.makedirs(target_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=target_dir)
        source = fetch(tmp)
        for n in missing:
            if not os.path.isfile(os.path.join(source, n)):
                raise FileNotFoundError(f"the download did not contain {n}")
        for n in missing:
            os.replace(os.path.join(source, n), os.path.join(target_dir, n))
    except BaseException as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if not isinstance(e, Exception):  # Ctrl-C stays Ctrl-C
            raise
        reason = " ".join(str(e).split()) or type(e).__name__  # torchvision's messages span lines
        raise FileNotFoundError(
            f"{what} not found: put {', '.join(missing)} in {target_dir}{alternative} "
            f"(download failed: {reason})"
        ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
