"""MNIST (28x28x1) and CIFAR-10 (32x32x3) as raw 8-bit levels (K=256): no normalisation, no augmentation.
Both carry their 10 classes as labels (``self.labels``, batches' ``label``).

Validation is carved out of the official training set with a fixed seed; test is the official test set.
Downloads go through torchvision, into a temporary folder that is renamed into place only when complete.
"""

import os
import pickle

import numpy as np
import torch
import torchvision
from torchvision.datasets.utils import extract_archive

from datamodules.base import ImageDataModule, fetch_atomically

SPLIT_SEED = 0  # fixed, so every run is validated on the same images


class _TorchvisionImages(ImageDataModule):
    """Shared by MNIST and CIFAR-10: subclasses say where the files lie and how to read them."""

    NUM_LEVELS = 256
    NUM_CLASSES = 10
    folder = ""  # where the files must lie, relative to data_dir
    files: list[str] = []

    def __init__(
        self, data_dir, batch_size, num_workers, num_channels, num_levels, image_size, val_size, num_classes
    ):
        super().__init__(batch_size, num_workers, num_channels, num_levels, image_size, num_classes)
        self.data_dir = os.path.expanduser(data_dir)
        self.val_size = val_size

    def download(self, tmp: str) -> str:
        """Downloads into ``tmp``; returns the folder inside it that holds ``files``."""
        raise NotImplementedError

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official training or test images as uint8 (N, C, H, W) and their classes (N,)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        fetch_atomically(
            os.path.join(self.data_dir, self.folder), self.files, self.download, self.name, self.alternative()
        )

    def alternative(self) -> str:
        """Another way to provide the files, for the error message."""
        return ""

    def setup(self, stage: str | None = None) -> None:
        source = os.path.join(self.data_dir, self.folder)
        missing = [f for f in self.files if not os.path.isfile(os.path.join(source, f))]
        if missing:
            raise FileNotFoundError(
                f"{self.name} not found: put {', '.join(missing)} in {source}{self.alternative()}"
            )
        if stage in ("fit", "validate", None) and "val" not in self.splits:
            images, labels = self.load(train=True)
            train = self.check_levels("train", images, source)
            labels = self.check_labels("train", labels, len(train), source)
            if not 0 < self.val_size < len(train):
                raise ValueError(f"data.val_size={self.val_size} must be between 1 and {len(train) - 1}")
            order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
            # Sorted, so validation images keep the official order.
            for split, rows in (("train", order[self.val_size :]), ("val", order[: self.val_size])):
                rows = torch.from_numpy(np.sort(rows))
                self.splits[split], self.labels[split] = train[rows], labels[rows]
        if stage in ("test", None) and "test" not in self.splits:
            images, labels = self.load(train=False)
            self.splits["test"] = self.check_levels("test", images, source)
            self.labels["test"] = self.check_labels("test", labels, len(images), source)


class MNISTDataModule(_TorchvisionImages):
    """MNIST: 55000/5000 train/val from the official 60000, and the official 10000 test images."""

    name = "MNIST"
    NUM_CHANNELS = 1
    IMAGE_SIZE = 28
    folder = os.path.join("MNIST", "raw")
    files = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        num_channels: int = 1,
        num_levels: int = 256,
        image_size: int = 28,
        val_size: int = 5000,
        num_classes: int = 10,
    ):
        super().__init__(
            data_dir, batch_size, num_workers, num_channels, num_levels, image_size, val_size, num_classes
        )

    def download(self, tmp: str) -> str:
        torchvision.datasets.MNIST(tmp, train=False, download=True)
        return os.path.join(tmp, self.folder)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision reads the uncompressed IDX files without checksums, so any valid IDX file loads.
        mnist = torchvision.datasets.MNIST(self.data_dir, train=train)
        return mnist.data.unsqueeze(1), mnist.targets


class CIFAR10DataModule(_TorchvisionImages):
    """CIFAR-10: 45000/5000 train/val from the official 50000, and the official 10000 test images."""

    name = "CIFAR-10"
    NUM_CHANNELS = 3
    IMAGE_SIZE = 32
    folder = "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    archive = "cifar-10-python.tar.gz"

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 32,
        num_workers: int = 0,
        num_channels: int = 3,
        num_levels: int = 256,
        image_size: int = 32,
        val_size: int = 5000,
        num_classes: int = 10,
    ):
        super().__init__(
            data_dir, batch_size, num_workers, num_channels, num_levels, image_size, val_size, num_classes
        )

    def alternative(self) -> str:
        return f", or {self.archive} in {self.data_dir}"

    def download(self, tmp: str) -> str:
        archive = os.path.join(self.data_dir, self.archive)
        if os.path.isfile(archive):  # the user fetched the archive by hand: unpacking needs no network
            extract_archive(archive, tmp)
        else:
            torchvision.datasets.CIFAR10(tmp, train=False, download=True)
        return os.path.join(tmp, self.folder)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Read the pickled batches directly: torchvision's CIFAR10 insists on the official checksums,
        # and the batches already hold each image as 3072 bytes in (C, H, W) order.
        names = self.files[:5] if train else self.files[5:]
        arrays, labels = [], []
        for name in names:
            path = os.path.join(self.data_dir, self.folder, name)
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data = batch.get("data") if isinstance(batch, dict) else None
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
                raise ValueError(
                    f"{path} is not a CIFAR-10 batch: expected a dict whose 'data' is uint8 (N, 3072)"
                )
            classes = batch.get("labels")
            if not isinstance(classes, (list, np.ndarray)) or len(classes) != len(data):
                raise ValueError(f"{path} is not a CIFAR-10 batch: expected 'labels', one per image")
            arrays.append(data)
            labels.append(np.asarray(classes, dtype=np.int64))
        images = torch.from_numpy(np.concatenate(arrays).reshape(-1, 3, 32, 32))
        return images, torch.from_numpy(np.concatenate(labels))
