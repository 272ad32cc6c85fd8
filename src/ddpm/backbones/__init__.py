"""Noise-prediction networks eps_theta(x, t): forward(x, t) -> tensor shaped like x.

Each exposes `data_shape`, the shape of one example it takes, so that a mismatch with the data
is caught before training.
"""

from ddpm.backbones.mlp import MLP
from ddpm.backbones.unet import UNet

__all__ = ["MLP", "UNet"]
