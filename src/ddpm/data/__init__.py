"""LightningDataModules. Each has fixed, seeded train/val/test splits held in memory (uint8
levels for images; `StreamingDataModule` streams them from disk or s3), a global `batch_size`
split evenly over the devices, `data_shape` (one example) and `num_levels` (the number of values
a coordinate takes in the data, or None for continuous data)."""

from ddpm.data.base import ImageDataModule, PointDataModule, TensorDataModule
from ddpm.data.digits import DigitsDataModule
from ddpm.data.gmm import GaussianMixtureDataModule
from ddpm.data.image_folder import ImageFolderDataModule
from ddpm.data.streaming import StreamingDataModule
from ddpm.data.toy2d import TOY2D_NAMES, Toy2DDataModule
from ddpm.data.vision import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "TOY2D_NAMES",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GaussianMixtureDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "PointDataModule",
    "StreamingDataModule",
    "TensorDataModule",
    "TorchvisionDataModule",
    "Toy2DDataModule",
]
