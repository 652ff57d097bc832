"""LightningDataModules whose batches are (levels, index): integer images (B, C, H, W), split indices."""

from datamodules.binarized_mnist import BinarizedMNISTDataModule
from datamodules.digits import DigitsDataModule
from datamodules.torchvision_images import CIFAR10DataModule, MNISTDataModule

__all__ = ["BinarizedMNISTDataModule", "CIFAR10DataModule", "DigitsDataModule", "MNISTDataModule"]
