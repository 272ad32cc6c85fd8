"""Sample from a trained checkpoint: `ddpm-sample ckpt_path=...` (or `python -m ddpm.sample`)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from ddpm.checkpoint import Trained, load_trained_for, pick_device
from ddpm.checks import check_int
from ddpm.cli import CONF_DIR, user_errors
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import batch_seed, gather_in_order, my_share, world
from ddpm.figures import image_grid, scatter_plot, trajectory_figure

log = logging.getLogger(__name__)

SAMPLERS = ("ancestral", "ddim", "respaced")
Trajectory = list[tuple[int, torch.Tensor, torch.Tensor]]


def sampling_chain(
    diffusion: GaussianDiffusion, sampler: str, steps: int | None, eta: float
) -> tuple[GaussianDiffusion, float | None]:
    """The chain to run and its DDIM eta (None: ancestral steps) for a sampler choice."""
    if sampler == "ancestral":
        return diffusion, None
    if sampler == "respaced":
        if steps is None:
            raise ValueError("sampler=respaced needs steps=K, the number of steps to keep.")
        return diffusion.respace(steps), None
    if sampler == "ddim":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta!r} is invalid: it must lie in [0, 1].")
        return diffusion.respace(steps or diffusion.num_timesteps), eta
    raise ValueError(f"sampler={sampler!r} is unknown: allowed are {', '.join(SAMPLERS)}.")


def check_sampling(
    diffusion: GaussianDiffusion,
    num_samples: int,
    batch_size: int,
    sampler: str,
    steps: int | None,
    eta: float,
) -> tuple[GaussianDiffusion, float | None]:
    """Check the sampling settings (one-sentence ValueErrors) and return `sampling_chain`'s."""
    check_int("num_samples", num_samples)
    check_int("batch_size", batch_size)
    return sampling_chain(diffusion, sampler, steps, eta)


def generate(
    trained: Trained,
    num_samples: int,
    batch_size: int,
    sampler: str = "ancestral",
    steps: int | None = None,
    eta: float = 0.0,
    clip_denoised: bool = True,
    seed: int = 0,
    trajectory_points: int = 0,
    device: str = "cpu",
) -> tuple[torch.Tensor, Trajectory]:
    """`num_samples` samples in batches (batch i seeded by `batch_seed(seed, i)`, so the samples
    are the same with any number of processes), and (t, x_t, predicted x_0) of the first batch's
    first few samples at `trajectory_points` times evenly spread along the chain."""
    chain, eta_or_none = check_sampling(
        trained.diffusion, num_samples, batch_size, sampler, steps, eta
    )
    backbone = trained.backbone.to(device)
    chain = chain.to(device)
    shape = tuple(backbone.data_shape)
    starts = range(0, num_samples, batch_size)
    rank, size = world()
    if size > 1 and rank == 0:
        log.info(f"sampling {len(starts)} batches on {size} processes")
    done = []
    for index, start in my_share(starts):  # every process its share, when torchrun started many
        x, marked = run_chain(
            chain,
            backbone,
            (min(batch_size, num_samples - start), *shape),
            torch.Generator().manual_seed(batch_seed(seed, index)),
            clip_denoised,
            eta_or_none,
            trajectory_points if start == 0 else 0,
            progress=True,
        )
        done.append((index, (x.cpu(), marked)))
    batches = gather_in_order(done)
    return torch.cat([x for x, _ in batches]), batches[0][1]


def run_chain(
    chain: GaussianDiffusion,
    backbone: torch.nn.Module,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    clip_denoised: bool,
    eta: float | None = None,
    trajectory_points: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, Trajectory]:
    """Run the reverse chain once: x_0, and (t, x_t, predicted x_0) of the first few samples at
    `trajectory_points` times evenly spread along the chain (t counted on the original chain)."""
    marks = set(np.linspace(chain.num_timesteps - 1, 0, trajectory_points).round().astype(int))
    trajectory = []
    steps = chain.sample_steps(backbone, shape, generator, clip_denoised, progress, eta=eta)
    for i, x, pred_x0 in steps:
        if i in marks:
            keep = 8 if x.ndim == 4 else 1000  # a few images, or a cloud of 2-D points
            trajectory.append((int(chain.timestep_map[i]), x[:keep].cpu(), pred_x0[:keep].cpu()))
    return x, trajectory


def to_levels(x: torch.Tensor, num_levels: int) -> np.ndarray:
    """Images in [-1, 1] -> uint8 NHWC on the data's `num_levels` values 0..num_levels-1."""
    q = ((x.clamp(-1, 1) + 1) / 2 * (num_levels - 1)).round().to(torch.uint8)
    return q.permute(0, 2, 3, 1).numpy()


def sample(cfg: DictConfig, output_dir: Path) -> Path:
    """Load, sample and write samples.png, samples.npz (and trajectory.png) to `output_dir`."""
    with user_errors():  # every check, before the long work
        trained = load_trained_for(cfg)
        check_sampling(
            trained.diffusion, cfg.num_samples, cfg.batch_size, cfg.sampler, cfg.steps, cfg.eta
        )
    clip = cfg.clip_denoised
    if clip is None:
        clip = trained.run_config["model"].get("clip_denoised", True)
    device = pick_device(cfg.device)
    samples, trajectory = generate(
        trained,
        cfg.num_samples,
        cfg.batch_size,
        cfg.sampler,
        cfg.steps,
        cfg.eta,
        clip,
        cfg.seed,
        trajectory_points=10 if cfg.trajectory else 0,
        device=device,
    )
    if world()[0] != 0:
        return output_dir  # rank 0 writes
    datamodule = trained.datamodule()
    output_dir.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        Image.fromarray(image_grid(samples[:64])).save(output_dir / "samples.png")
        levels = datamodule.num_levels or 256
        np.savez(output_dir / "samples.npz", samples=to_levels(samples, levels), num_levels=levels)
    else:
        Image.fromarray(scatter_plot(samples, datamodule.test_data)).save(
            output_dir / "samples.png"
        )
        np.savez(output_dir / "samples.npz", samples=samples.numpy().astype(np.float32))
    if trajectory:
        Image.fromarray(trajectory_figure(trajectory)).save(output_dir / "trajectory.png")
    log.info(f"{len(samples)} samples ({cfg.sampler}) written to {output_dir}")
    return output_dir


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
