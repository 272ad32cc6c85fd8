"""Sampling: reverse chains with their trajectories, and batched seeded generation from a trained
model (the same samples with any number of torchrun processes). The chain itself is
`GaussianDiffusion.sample_steps`; noise draws are `ddpm.diffusion.normal_draws`."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ddpm.checkpoint import Trained
from ddpm.checks import check_choice, check_int
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import batch_seed, gather_in_order, my_share, world

log = logging.getLogger(__name__)

SAMPLERS = ("ancestral", "ddim", "respaced")
Trajectory = list[tuple[int, torch.Tensor, torch.Tensor]]


def sampling_chain(
    diffusion: GaussianDiffusion, sampler: str, steps: int | None, eta: float
) -> tuple[GaussianDiffusion, float | None]:
    """The chain to run and its DDIM eta (None: ancestral steps) for a sampler choice."""
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ancestral":
        return diffusion, None
    if sampler == "respaced":
        if steps is None:
            raise ValueError("sampler=respaced needs steps=K, the number of steps to keep.")
        return diffusion.respace(steps), None
    if not 0.0 <= eta <= 1.0:  # ddim
        raise ValueError(f"eta={eta!r} is invalid: it must lie in [0, 1].")
    return diffusion.respace(steps or diffusion.num_timesteps), eta


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
    keep = trained.datamodule.trajectory_examples
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
            keep,
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
    trajectory_examples: int = 8,
    progress: bool = False,
) -> tuple[torch.Tensor, Trajectory]:
    """Run the reverse chain once: x_0, and (t, x_t, predicted x_0) of the first
    `trajectory_examples` samples at `trajectory_points` times evenly spread along the chain
    (t counted on the original chain)."""
    marks = set(np.linspace(chain.num_timesteps - 1, 0, trajectory_points).round().astype(int))
    trajectory = []
    steps = chain.sample_steps(backbone, shape, generator, clip_denoised, progress, eta=eta)
    for i, x, pred_x0 in steps:
        if i in marks:
            keep = trajectory_examples
            trajectory.append((int(chain.timestep_map[i]), x[:keep].cpu(), pred_x0[:keep].cpu()))
    return x, trajectory
