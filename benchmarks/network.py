"""What the single-network benchmarks (ode_likelihood.py, guidance.py) share: the command-line
keys that choose a network, and that network built from its conf/backbone/ file with random
weights (the cost, not the values, is what they measure)."""

from __future__ import annotations

import argparse
from importlib.resources import files

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ddpm.config import CONFIG_MODULE


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --backbone (a conf/backbone/ option), --image-size, --channels."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="unet", help="a conf/backbone/ option")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)


def random_network(args: argparse.Namespace, num_classes: int | None = None) -> torch.nn.Module:
    """The chosen backbone for images of the chosen size, seeded random weights, in eval mode on
    the device (with `num_classes`: class-conditional)."""
    node = OmegaConf.load(files(CONFIG_MODULE) / "backbone" / f"{args.backbone}.yaml")
    data = {"channels": args.channels, "image_size": args.image_size}
    cfg = OmegaConf.create({"data": data, "diffusion": {"variance": "beta"}, "backbone": node})
    if num_classes is not None:
        cfg.backbone.num_classes = num_classes
    torch.manual_seed(0)
    return instantiate(cfg.backbone).to(args.device).eval()
