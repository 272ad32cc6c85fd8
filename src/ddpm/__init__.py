"""Denoising diffusion probabilistic models with PyTorch Lightning and Hydra."""

from ddpm.config import register_resolvers

register_resolvers()
