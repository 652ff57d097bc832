"""What every data module shares: declared facts, the dict batches, and atomic downloads.

Each split is held whole in memory as a uint8 tensor (N, C, H, W) of levels in {0..K-1}. A batch is a dict:
``levels`` (B, C, H, W) uint8, ``index`` (B,) int64, the position of each image within its split, and, for
data with classes, ``label`` (B,) int64 in {0..num_classes-1}.
"""

import os
import shutil
import tempfile
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


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


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses set the facts below and fill ``self.splits`` in ``setup``."""

    name = ""  # for messages, e.g. "binarized MNIST"
    NUM_CHANNELS = 0
    NUM_LEVELS = 0
    IMAGE_SIZE = 0

    def __init__(
        self, batch_size: int, num_workers: int, num_channels: int, num_levels: int, image_size: int
    ):
        super().__init__()
        # The config declares these so model configs can interpolate them; a wrong one must fail here,
        # not as a shape error deep inside the model.
        for key, declared, actual in (
            ("num_channels", num_channels, self.NUM_CHANNELS),
            ("num_levels", num_levels, self.NUM_LEVELS),
            ("image_size", image_size, self.IMAGE_SIZE),
        ):
            if declared != actual:
                raise ValueError(
                    f"data.{key}={declared} does not match {self.name} ({key}={actual}): "
                    f"set data.{key}={actual}"
                )
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.image_size = image_size
        self.splits: dict[str, torch.Tensor] = {}
        # Per split, the class of each image (int64 (N,)), for data with classes (``num_classes`` > 0).
        self.labels: dict[str, torch.Tensor] = {}

    num_classes = 0  # data with classes sets it (and fills ``self.labels``)

    def has_test_split(self) -> bool:
        return True

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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise RuntimeError(f"{self.name}: the {split} split is not loaded; call setup() first")
        return DataLoader(
            IndexedImages(self.splits[split], self.labels.get(split)),
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
