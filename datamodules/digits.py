"""scikit-learn's 8x8 handwritten digits: 1797 images, levels 0..16 (K=17), classes 0..9. Bundled, so it works
offline."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from datamodules.base import ImageDataModule

NUM_VAL = 300
NUM_TEST = 300
SPLIT_SEED = 0  # fixed, so every run is validated and tested on the same images


class DigitsDataModule(ImageDataModule):
    """Train/val/test = 1197/300/300 images, split once with a fixed seed."""

    name = "the sklearn digits"
    NUM_CHANNELS = 1
    NUM_LEVELS = 17
    IMAGE_SIZE = 8
    NUM_CLASSES = 10

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        num_channels: int = 1,
        num_levels: int = 17,
        image_size: int = 8,
        num_classes: int = 10,
    ):
        super().__init__(batch_size, num_workers, num_channels, num_levels, image_size, num_classes)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        images = digits.images  # float64 (1797, 8, 8) holding the integers 0..16
        levels = self.check_levels(
            "all", torch.from_numpy(images.astype(np.uint8)).unsqueeze(1), "load_digits"
        )
        labels = self.check_labels("all", torch.from_numpy(digits.target), len(levels), "load_digits")
        order = np.random.default_rng(SPLIT_SEED).permutation(len(levels))
        num_train = len(levels) - NUM_VAL - NUM_TEST
        # Sorted within each split, so val and test images keep the dataset's order.
        parts = np.split(order, [num_train, num_train + NUM_VAL])
        for split, part in zip(("train", "val", "test"), parts, strict=True):
            rows = torch.from_numpy(np.sort(part))
            self.splits[split] = levels[rows]
            self.labels[split] = labels[rows]
