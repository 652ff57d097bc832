"""Binarized MNIST, the static binarization of Larochelle & Murray (2011): 28x28, K=2, 50000/10000/10000.

Read from ``<data_dir>/binarized_mnist/binarized_mnist_{train,valid,test}.amat`` (one image per line, 784
space-separated 0/1, row-major), downloaded when missing. The test file is optional: without it training
and validation work and ``has_test_split()`` is False.
"""

import logging
import os
import shutil
import urllib.request

import numpy as np
import torch

from datamodules.base import ImageDataModule, fetch_atomically

log = logging.getLogger(__name__)

URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
FILES = {
    "train": "binarized_mnist_train.amat",
    "val": "binarized_mnist_valid.amat",
    "test": "binarized_mnist_test.amat",
}
NUM_PIXELS = 28 * 28


def download_file(url: str, path: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)
        expected = response.headers.get("Content-Length")
    if expected is not None and os.path.getsize(path) != int(expected):
        raise OSError(f"{url}: got {os.path.getsize(path)} of {expected} bytes")


def read_amat(path: str) -> np.ndarray:
    """Parses a 0/1 .amat file into uint8 (N, 784); a bad line raises ValueError naming file and line."""
    with open(path, "rb") as f:
        text = np.frombuffer(f.read(), dtype=np.uint8)
    # Vectorised over the bytes, because np.loadtxt is far too slow for 50000 lines of 784 values.
    # The official layout, "v v ... v\n" (1568 bytes a line), reads as a strided view of the bytes.
    width = 2 * NUM_PIXELS
    if len(text) and len(text) % width == 0:
        rows = text.reshape(-1, width)
        values = rows[:, ::2] - ord("0")  # other characters wrap around to values above 1
        if (values <= 1).all() and (rows[:, 1:-1:2] == ord(" ")).all() and (rows[:, -1] == ord("\n")).all():
            return values
    return _read_amat_slowly(path, text)


def _read_amat_slowly(path: str, text: np.ndarray) -> np.ndarray:
    """Any spacing and line ends, and the exact line of the first error."""
    is_value = (text == ord("0")) | (text == ord("1"))
    is_newline = text == ord("\n")
    is_space = (text == ord(" ")) | (text == ord("\t")) | (text == ord("\r"))

    def line_of(position: int) -> int:
        return int(np.count_nonzero(is_newline[:position])) + 1

    bad = np.flatnonzero(~(is_value | is_newline | is_space))
    if len(bad):
        char = chr(text[bad[0]])
        raise ValueError(f"{path} line {line_of(bad[0])}: unexpected character {char!r}, expected 0/1 values")
    glued = np.flatnonzero(is_value[:-1] & is_value[1:])  # "01" is one value, neither 0 nor 1
    if len(glued):
        raise ValueError(f"{path} line {line_of(glued[0])}: values must be single 0/1 separated by spaces")
    # Values per line: each line's slice of the bytes, newline included, summed in one call.
    starts = np.concatenate([[0], np.flatnonzero(is_newline) + 1])
    starts = starts[starts < len(text)]
    counts = np.add.reduceat(is_value, starts, dtype=np.int64) if len(starts) else np.zeros(0, np.int64)
    if not counts.any():
        raise ValueError(f"{path} holds no images")
    wrong = np.flatnonzero((counts != NUM_PIXELS) & (counts != 0))  # blank lines are skipped
    if len(wrong):
        raise ValueError(f"{path} line {wrong[0] + 1}: {counts[wrong[0]]} values, expected {NUM_PIXELS}")
    return (text[is_value] - ord("0")).reshape(-1, NUM_PIXELS)


class BinarizedMNISTDataModule(ImageDataModule):
    """Train/val/test from the .amat files; the test split only if its file is there."""

    name = "binarized MNIST"
    NUM_CHANNELS = 1
    NUM_LEVELS = 2
    IMAGE_SIZE = 28

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        num_channels: int = 1,
        num_levels: int = 2,
        image_size: int = 28,
        num_classes: int = 0,  # the .amat files carry no labels
    ):
        super().__init__(batch_size, num_workers, num_channels, num_levels, image_size, num_classes)
        self.data_dir = os.path.expanduser(data_dir)
        self.folder = os.path.join(self.data_dir, "binarized_mnist")

    def path(self, split: str) -> str:
        return os.path.join(self.folder, FILES[split])

    def has_test_split(self) -> bool:
        return os.path.isfile(self.path("test"))

    def _fetch(self, names: list[str]):
        def fetch(tmp: str) -> str:
            for name in names:
                download_file(URL + name, os.path.join(tmp, name))
                read_amat(os.path.join(tmp, name))  # an error page saved as .amat must not be kept
            return tmp

        return fetch

    def prepare_data(self) -> None:
        required = [FILES["train"], FILES["val"]]
        fetch_atomically(self.folder, required, self._fetch(required), self.name)
        # The test file is a bonus: failing to get it (offline, read-only folder) must not stop training.
        try:
            fetch_atomically(
                self.folder, [FILES["test"]], self._fetch([FILES["test"]]), self.name + " test split"
            )
        except FileNotFoundError as e:
            log.warning("%s; training and validation go on without a test split", e)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}
        splits = wanted.get(stage, ["train", "val", "test"] if self.has_test_split() else ["train", "val"])
        for split in splits:
            if split in self.splits:
                continue
            path = self.path(split)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{self.name} {split} split not found: put {FILES[split]} in {self.folder}"
                )
            levels = torch.from_numpy(read_amat(path)).view(-1, 1, 28, 28)
            self.splits[split] = self.check_levels(split, levels, path)
