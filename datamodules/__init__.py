"""LightningDataModules whose batches are dicts: ``levels`` uint8 (B, C, H, W), ``index`` int64 (B,) (each
image's position in its split) and, for data with classes, ``label`` int64 (B,)."""

from datamodules.binarized_mnist import BinarizedMNISTDataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.imagenet import ImageNet32DataModule, ImageNet64DataModule
from datamodules.torchvision_images import CIFAR10DataModule, MNISTDataModule

__all__ = [
    "BinarizedMNISTDataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageNet32DataModule",
    "ImageNet64DataModule",
    "MNISTDataModule",
]
