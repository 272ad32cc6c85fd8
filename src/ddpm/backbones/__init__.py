"""The networks: forward(x, t) -> the prediction, shaped like x (with a learned variance, twice
the channels: `out_channels` / `out_dim`, set in the config from the variance).

Each exposes `data_shape`, the shape of one example it takes, so that a mismatch with the data
is caught before training.
"""

from collections.abc import Mapping
from typing import Any

import torch

from ddpm.backbones.mlp import MLP
from ddpm.backbones.unet import UNet

__all__ = ["MLP", "UNet", "compile_backbone", "set_channels_last", "set_matmul_precision"]

MATMUL_PRECISIONS = ("highest", "high", "medium")


def compile_backbone(backbone: torch.nn.Module, option: Any) -> None:
    """`compile=true` (or a dict of torch.compile options, e.g. `{mode: reduce-overhead}`):
    compile the backbone's forward in place, so parameter names and checkpoints stay the same.
    The same key in train.py, ddpm-sample and ddpm-eval."""
    if option is None or option is False:
        return
    if option is not True and not isinstance(option, Mapping):
        raise ValueError(
            f"compile={option!r} is invalid: allowed are true, false or a dict of torch.compile "
            "options such as {mode: max-autotune}."
        )
    backbone.compile(**({} if option is True else dict(option)))


def set_channels_last(backbone: torch.nn.Module, option: Any) -> None:
    """`channels_last=true`: the backbone's 4-D weights in channels-last (NHWC) memory order, in
    place, so that its convolutions, and with them their outputs, take torch's NHWC kernels
    (faster on the CPU: benchmarks/README.md); names, values and checkpoints stay the same.
    Networks without 4-D weights (the MLP) are left as they are."""
    if not isinstance(option, bool):
        raise ValueError(f"channels_last={option!r} is invalid: allowed are true, false.")
    if option:
        backbone.to(memory_format=torch.channels_last)


def set_matmul_precision(value: Any) -> None:
    """`matmul_precision`: torch.set_float32_matmul_precision for this process. `high` (the
    default) lets float32 matrix products use TF32 on NVIDIA GPUs (Ampere and newer), as cuDNN's
    convolutions already do by default; `highest` is full float32; the CPU ignores it."""
    if value is None:
        return
    if value not in MATMUL_PRECISIONS:
        raise ValueError(
            f"matmul_precision={value!r} is invalid: allowed are {', '.join(MATMUL_PRECISIONS)}."
        )
    torch.set_float32_matmul_precision(value)
