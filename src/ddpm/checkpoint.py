"""Load a trained model from a checkpoint written by train.py, for sampling and evaluation."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from ddpm.backbones import compile_backbone, set_matmul_precision
from ddpm.diffusion import GaussianDiffusion
from ddpm.schedules import make_beta_schedule


@dataclass
class Trained:
    """A trained eps-network with its diffusion and the config it was trained with."""

    backbone: nn.Module
    diffusion: GaussianDiffusion
    run_config: dict[str, Any]

    def datamodule(self) -> Any:
        """The run's data module (its splits are rebuilt from the config, with the same seeds)."""
        return instantiate(self.run_config["data"])


def read_checkpoint(ckpt_path: object) -> dict[str, Any]:
    """torch.load a ddpm checkpoint (weights only: no code runs) or raise one clear ValueError."""
    if ckpt_path in (None, "", "???"):
        raise ValueError(
            "ckpt_path is required: pass ckpt_path=<a .ckpt file written by train.py>."
        )
    path = Path(str(ckpt_path))
    if path.is_dir():
        raise ValueError(
            f"ckpt_path={path} is a folder; pass a checkpoint file, e.g. "
            f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}."
        )
    if not path.is_file():
        raise ValueError(f"ckpt_path={path} does not exist: pass the path of a .ckpt file.")
    try:
        # mmap: the tensors are read only when used, so checking a large file costs little
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, foreign or hostile files all end here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"ckpt_path={path} is not a readable checkpoint ({reason}).") from None
    config = (
        checkpoint.get("hyper_parameters", {}).get("run_config")
        if isinstance(checkpoint, dict)
        else None
    )
    if not isinstance(config, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={path} holds no ddpm run (no hyper_parameters.run_config and state_dict): "
            "pass a checkpoint written by train.py."
        )
    return checkpoint


def check_same_model(run_config: dict[str, Any], checkpoint: dict[str, Any], path: object) -> None:
    """Refuse to resume when the diffusion (schedule, T, variance) or the backbone differ from
    the checkpoint's, naming the first key that differs and both values."""
    trained = checkpoint["hyper_parameters"]["run_config"]
    for group in ("diffusion", "backbone"):
        ours, theirs = _leaves(run_config[group], group), _leaves(trained[group], group)
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                raise ValueError(
                    f"{key}={ours.get(key)!r} differs from {theirs.get(key)!r} in "
                    f"ckpt_path={path}: resuming needs the same schedule, T, variance and backbone."
                )


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    """{'a.b.c': value} for the leaves of nested dicts."""
    if not isinstance(node, dict):
        return {prefix: node}
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        leaves.update(_leaves(value, f"{prefix}.{key}"))
    return leaves


def load_trained_for(cfg: Any) -> Trained:
    """`load_trained` with the keys that sample.yaml and eval.yaml share, the backbone compiled
    as `compile` asks and `matmul_precision` set."""
    set_matmul_precision(cfg.get("matmul_precision"))
    schedule = cfg.schedule.name if cfg.get("schedule") else None
    trained = load_trained(
        cfg.ckpt_path,
        cfg.use_ema,
        cfg.diffusion.variance,
        schedule,
        cfg.timesteps,
        cfg.allow_schedule_change,
    )
    compile_backbone(trained.backbone, cfg.get("compile"))
    return trained


def pick_device(name: str) -> str:
    """`auto` is this process's GPU when one is visible (cuda:LOCAL_RANK under torchrun), else
    cpu."""
    if name == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return name


def load_trained(
    ckpt_path: object,
    use_ema: bool = True,
    variance: str | None = None,
    schedule: str | None = None,
    timesteps: int | None = None,
    allow_schedule_change: bool = False,
) -> Trained:
    """Rebuild the backbone and diffusion of a checkpoint and load its weights.

    `use_ema` picks the EMA weights (the checkpoint's `state_dict`) or the raw ones. `variance`
    may differ from training (the same eps-network serves both sigma_t^2). A `schedule` or
    `timesteps` other than the trained ones is refused unless `allow_schedule_change` is true.
    """
    checkpoint = read_checkpoint(ckpt_path)
    config = copy.deepcopy(checkpoint["hyper_parameters"]["run_config"])
    trained_schedule = config["diffusion"]["betas"]
    trained_name, trained_t = trained_schedule["name"], trained_schedule["timesteps"]
    for key, asked, trained in (
        ("schedule", schedule, trained_name),
        ("timesteps", timesteps, trained_t),
    ):
        if asked is not None and asked != trained and not allow_schedule_change:
            raise ValueError(
                f"{key}={asked!r} differs from the checkpoint's {key}={trained!r}: the network was "
                f"trained on that chain; drop {key}, or set allow_schedule_change=true to use it."
            )
    name, T = schedule or trained_name, timesteps or trained_t
    fixed = ("_target_", "name", "timesteps")
    params = {k: v for k, v in trained_schedule.items() if k not in fixed}
    betas = make_beta_schedule(name, T, **(params if name == trained_name else {}))
    diffusion = GaussianDiffusion(betas, variance or config["diffusion"]["variance"])
    config["diffusion"]["variance"] = diffusion.variance

    backbone = instantiate(config["backbone"])
    state = checkpoint["state_dict"] if use_ema else checkpoint.get("current_model_state")
    if state is None:
        raise ValueError(f"use_ema=false, but ckpt_path={ckpt_path} holds only the EMA weights.")
    prefix = "backbone."
    backbone.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    backbone.eval()
    return Trained(backbone, diffusion, config)
