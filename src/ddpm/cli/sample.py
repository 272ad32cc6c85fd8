"""`ddpm-sample ckpt_path=...` (or `python -m ddpm.cli.sample`): sample a trained checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from ddpm.checkpoint import load_trained_for, pick_device
from ddpm.cli.common import plain, quiet_known_noise, user_errors
from ddpm.conditioning import label_rows
from ddpm.config import CONFIG_PATH
from ddpm.distributed import world
from ddpm.sampling import check_guidance, check_sampling, generate, sampler_of

log = logging.getLogger(__name__)


def sample(cfg: DictConfig, output_dir: Path) -> Path:
    """Load, sample and write samples.png, samples.npz (and trajectory.png) to `output_dir`; with
    `labels`, `num_samples` of each class (samples.npz's `labels`), guided at `guidance_scale`."""
    with user_errors():  # every check, before the long work
        trained = load_trained_for(cfg)
        clip = trained.clip_denoised(cfg.clip_denoised)
        sampler = check_sampling(
            trained.diffusion, cfg.num_samples, cfg.batch_size, sampler_of(cfg)
        )
        classes, scale = check_guidance(trained, plain(cfg.labels), cfg.guidance_scale)
    y = None if classes is None else label_rows(classes, cfg.num_samples)
    samples, trajectory = generate(
        trained,
        cfg.num_samples if y is None else len(y),
        cfg.batch_size,
        sampler,
        clip,
        cfg.seed,
        trajectory_points=10 if cfg.trajectory else 0,
        device=pick_device(cfg.device),
        labels=y,
        guidance_scale=scale,
    )
    if world()[0] != 0:
        return output_dir  # rank 0 writes
    data = trained.datamodule
    output_dir.mkdir(parents=True, exist_ok=True)
    if y is None:
        picture = data.show(samples)
    else:  # one row per class, its first (up to) 16 samples
        per_row = min(cfg.num_samples, 16)
        first = torch.arange(len(y)) % cfg.num_samples < per_row
        picture = data.show(samples[first], per_row=per_row)
    Image.fromarray(picture).save(output_dir / "samples.png")
    stored = data.store(samples)
    if y is not None:
        stored["labels"] = y.numpy()
    np.savez(output_dir / "samples.npz", **stored)
    if trajectory:
        Image.fromarray(data.show_trajectory(trajectory)).save(output_dir / "trajectory.png")
    log.info(f"{len(samples)} samples ({sampler.option}) written to {output_dir}")
    return output_dir


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    sample(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
