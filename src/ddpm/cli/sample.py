"""`ddpm-sample ckpt_path=...` (or `python -m ddpm.cli.sample`): sample a trained checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from ddpm.checkpoint import load_trained_for, pick_device
from ddpm.cli.common import quiet_known_noise, user_errors
from ddpm.config import CONFIG_PATH
from ddpm.distributed import world
from ddpm.sampling import check_sampling, generate, sampler_of

log = logging.getLogger(__name__)


def sample(cfg: DictConfig, output_dir: Path) -> Path:
    """Load, sample and write samples.png, samples.npz (and trajectory.png) to `output_dir`."""
    with user_errors():  # every check, before the long work
        trained = load_trained_for(cfg)
        clip = trained.clip_denoised(cfg.clip_denoised)
        sampler = check_sampling(
            trained.diffusion, cfg.num_samples, cfg.batch_size, sampler_of(cfg)
        )
    samples, trajectory = generate(
        trained,
        cfg.num_samples,
        cfg.batch_size,
        sampler,
        clip,
        cfg.seed,
        trajectory_points=10 if cfg.trajectory else 0,
        device=pick_device(cfg.device),
    )
    if world()[0] != 0:
        return output_dir  # rank 0 writes
    data = trained.datamodule
    output_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.show(samples)).save(output_dir / "samples.png")
    np.savez(output_dir / "samples.npz", **data.store(samples))
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
