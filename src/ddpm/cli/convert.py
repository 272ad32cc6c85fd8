"""`ddpm-import source=<diffusers folder> out=<file.ckpt>` and `ddpm-export ckpt_path=<file.ckpt>
out=<folder>`: the paper's released models (diffusers' format) as checkpoints of this framework,
and back (`ddpm.convert`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import read_checkpoint
from ddpm.cli.common import quiet_known_noise, user_errors
from ddpm.config import CONFIG_PATH
from ddpm.convert import (
    backbone_node,
    diffusion_node,
    from_diffusers,
    is_learned,
    read_diffusers,
    scheduler_config,
    to_diffusers,
    unet_config,
    write_diffusers,
)

log = logging.getLogger(__name__)
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2.0e-4}


def _data_choice(cfg: DictConfig) -> str:
    """The `data` option as typed (its class name outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get("data"))
    return str(cfg.data._target_).rsplit(".", 1)[-1]


def import_model(cfg: DictConfig) -> Path:
    """Read the folder, build our network and chain from its configs, map its weights, check
    them against the data, and write a checkpoint (through a temporary file: a kill leaves no
    half-written one)."""
    with user_errors():
        out = Path(cfg.out)
        if out.exists():
            raise ValueError(f"out={out} exists: choose a new file (nothing is overwritten).")
        config, state, scheduler = read_diffusers(cfg.source)
        node = backbone_node(config)
        diffusion = diffusion_node(scheduler, is_learned(node))
        data = OmegaConf.to_container(cfg.data, resolve=True)
        shape = (node["in_channels"], node["image_size"], node["image_size"])
        found = tuple(instantiate(data).data_shape)
        if found != shape:
            raise ValueError(
                f"data={_data_choice(cfg)} has examples of shape {found}, but "
                f"the network takes {shape}: choose the data it was trained on (e.g. "
                f"data=image_folder data.root=... data.image_size={shape[1]})."
            )
        backbone = instantiate(node)
        mapped = from_diffusers(state, node)
        unused = sorted(set(state) - set(to_diffusers(mapped, node)))
        if unused:
            raise ValueError(
                f"source={cfg.source} has weights the DDPM layout does not use ({unused[0]}, "
                f"{len(unused)} in all): it is not a model this imports."
            )
        backbone.load_state_dict(mapped)
        instantiate(diffusion)  # a chain that cannot be built is refused here
    run_config: dict[str, Any] = {
        "backbone": node,
        "diffusion": diffusion,
        "data": data,
        "timesteps": diffusion["betas"]["timesteps"],
        "conditioning": {"name": "none"},
        "model": {
            "optimizer": OPTIMIZER,
            "clip_denoised": bool(scheduler.get("clip_sample", True)),
        },
        "imported_from": str(Path(cfg.source).resolve()),
    }
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    checkpoint = {
        "state_dict": weights,
        "current_model_state": weights,
        "hyper_parameters": {"run_config": run_config},
        "global_step": 0,
        "epoch": 0,
        "pytorch-lightning_version": lightning.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    torch.save(checkpoint, temporary)
    temporary.replace(out)
    count = sum(v.numel() for v in weights.values())
    log.info(
        f"{cfg.source}: {count:,} parameters, T = {run_config['timesteps']}, variance "
        f"{diffusion['variance']}, prediction {diffusion['prediction']}; written to {out}"
    )
    return out


def export_model(cfg: DictConfig) -> Path:
    """A checkpoint's network and chain as a DDPMPipeline folder."""
    with user_errors():
        out = Path(cfg.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(
                f"out={out} is not empty: choose a new folder (nothing is overwritten)."
            )
        checkpoint = read_checkpoint(cfg.ckpt_path)
        config = checkpoint["hyper_parameters"]["run_config"]
        node = config["backbone"]
        unet = unet_config(node)
        clip = bool(config.get("model", {}).get("clip_denoised", True))
        scheduler = scheduler_config(config["diffusion"], clip)
        state = checkpoint["state_dict"] if cfg.use_ema else checkpoint.get("current_model_state")
        if state is None:
            raise ValueError(
                f"use_ema=false, but ckpt_path={cfg.ckpt_path} holds only the EMA weights."
            )
    ours = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    write_diffusers(out, unet, to_diffusers(ours, node), scheduler)
    log.info(f"{cfg.ckpt_path} written to {out} (diffusers' DDPMPipeline format)")
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="import")
def import_main(cfg: DictConfig) -> None:
    quiet_known_noise()
    import_model(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def export_main(cfg: DictConfig) -> None:
    quiet_known_noise()
    export_model(cfg)
