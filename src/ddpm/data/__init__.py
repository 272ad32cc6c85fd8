"""LightningDataModules. Each has fixed, seeded train/val/test splits held in memory, a global
`batch_size` split evenly over the devices, `data_shape` (one example) and `num_levels` (the
number of values a coordinate takes in the data, or None for continuous data)."""

from ddpm.data.base import TensorDataModule
from ddpm.data.digits import DigitsDataModule
from ddpm.data.toy2d import TOY2D_NAMES, Toy2DDataModule

__all__ = ["TOY2D_NAMES", "DigitsDataModule", "TensorDataModule", "Toy2DDataModule"]
