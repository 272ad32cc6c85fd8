"""Sampling from a trained model: the sampler of a `conf/sampler/<name>.yaml` node, checked before
any work, and batched seeded generation with trajectories (the same samples with any number of
torchrun processes). The samplers themselves are `ddpm.samplers`."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import Trained
from ddpm.checks import check_int
from ddpm.conditioning import Guided, batch_labels, check_guidance_scale, check_labels
from ddpm.diffusion import GaussianDiffusion
from ddpm.distributed import batch_seed, gather_in_order, my_share, world
from ddpm.samplers import DDIM, ODE, Ancestral, DPMSolver, Sampler, UniPC
from ddpm.samplers.base import initial_noise

SAMPLERS = (Ancestral, DDIM, DPMSolver, ODE, UniPC)

log = logging.getLogger(__name__)

Trajectory = list[tuple[int, torch.Tensor, torch.Tensor]]


def old_spelling(node: Any, steps: Any = None, eta: Any = None, key: str = "sampler") -> None:
    """A one-sentence ValueError giving the new spelling of the keys of before the sampler was a
    config group: `sampler=respaced` (conf/sampler/respaced.yaml says `renamed`) and the top-level
    `steps=` and `eta=`."""
    renamed = isinstance(node, (dict, DictConfig)) and bool(node.get("renamed"))
    if not renamed and steps is None and eta is None:
        return
    name = "ancestral" if renamed else get_class(node["_target_"]).option
    prefix = key.removesuffix("sampler")
    old = [f"{key}=respaced"] if renamed else []
    new = [f"{key}={name}"]
    for old_key, value in (("steps", steps), ("eta", eta)):
        if value is not None:
            old.append(f"{prefix}{old_key}={value}")
            new.append(f"{key}.{old_key}={value}")
    raise ValueError(
        f"{' '.join(old)} is now written {' '.join(new)}: the sampler is a config group "
        "(conf/sampler/: ancestral, ddim, dpm_solver, ode, unipc) with its own keys."
    )


def build_sampler(node: Any, key: str = "sampler") -> Sampler:
    """The sampler a `conf/sampler` node describes (or the sampler itself): a one-sentence
    ValueError for a key the sampler does not have, naming its keys, and for a bad value."""
    if isinstance(node, Sampler):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or "_target_" not in node:
        options = ", ".join(c.option for c in SAMPLERS)
        raise ValueError(
            f"{key}={node!r} is not a sampler: the sampler is a config group ({options}), "
            "chosen with sampler=<name> in ddpm-sample and ddpm-eval, and in train.py with "
            "sampler@eval.sampler=<name> or sampler@callbacks.samples.sampler=<name>."
        )
    old_spelling(node, key=key)
    kwargs = {k: v for k, v in node.items() if k != "_target_"}
    cls = get_class(node["_target_"])
    allowed = list(inspect.signature(cls).parameters)
    for name, value in kwargs.items():
        if name not in allowed:
            owners = [c.option for c in SAMPLERS if name in inspect.signature(c).parameters]
            raise ValueError(
                f"{key}.{name}={value!r} is not a key of {key}={cls.option}: its keys are "
                f"{', '.join(allowed)}"
                + (f" ({name} is a key of {key}={' and '.join(owners)})." if owners else ".")
            )
    return cls(**kwargs)


def sampler_of(cfg: DictConfig, key: str = "sampler") -> Sampler:
    """The sampler of a command's config (`sampler`, refusing the old top-level `steps`, `eta`)."""
    old_spelling(cfg.sampler, cfg.get("steps"), cfg.get("eta"), key)
    return build_sampler(cfg.sampler, key)


def check_sampling(
    diffusion: GaussianDiffusion, num_samples: int, batch_size: int, sampler: Any
) -> Sampler:
    """Check the sampling settings against the trained chain (one-sentence ValueErrors) and
    return the sampler."""
    check_int("num_samples", num_samples)
    check_int("batch_size", batch_size)
    sampler = build_sampler(sampler)
    sampler.timesteps(diffusion)  # steps that this chain cannot take are refused here
    return sampler


def check_guidance(
    trained: Trained, labels: Any = None, guidance_scale: Any = 1.0
) -> tuple[list[int] | None, float]:
    """`labels` (null | all | a list of classes) and `guidance_scale` checked against the model:
    labels and a scale other than 1 need a conditional model, and sampling without labels or
    with guidance needs one trained with null labels (conditioning.drop_prob > 0). Returns the
    classes asked for (None: the null label) and the scale."""
    scale = check_guidance_scale(guidance_scale)
    num_classes = trained.num_classes
    if num_classes is None:
        if labels is not None or scale != 1:
            key = "labels" if labels is not None else "guidance_scale"
            value = labels if labels is not None else guidance_scale
            raise ValueError(
                f"{key}={value!r} needs a conditional model, but this one was trained with "
                "conditioning=none: train with conditioning=class, or drop labels= and "
                "guidance_scale=."
            )
        return None, scale
    classes = None if labels is None else check_labels(labels, num_classes)
    if trained.drop_prob == 0 and (classes is None or scale != 1):
        raise ValueError(
            ("labels= is needed" if classes is None else f"guidance_scale={scale:g} is impossible")
            + ": this model was trained with conditioning.drop_prob=0, so it has no unconditional "
            "(null-label) model to sample or guide with; pass labels=all or labels=[...] with "
            "guidance_scale=1."
        )
    return classes, scale


def generate(
    trained: Trained,
    num_samples: int,
    batch_size: int,
    sampler: Any,
    clip_denoised: bool = True,
    seed: int = 0,
    trajectory_points: int = 0,
    device: str = "cpu",
    labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, Trajectory]:
    """`num_samples` samples in batches (batch i seeded by `batch_seed(seed, i)`, so the samples
    are the same with any number of processes), and (t, x_t, predicted x_0) of the first batch's
    first few samples at `trajectory_points` times evenly spread along the sampler's steps.
    A conditional model samples sample i at class `labels[i]` (int64 [num_samples]; None: the
    null label), guided at `guidance_scale` (`ddpm.conditioning.Guided`)."""
    sampler = check_sampling(trained.diffusion, num_samples, batch_size, sampler)
    backbone = trained.backbone.to(device)
    diffusion = trained.diffusion.to(device)
    shape = tuple(backbone.data_shape)
    model = backbone
    if trained.num_classes is not None:
        model = Guided(backbone, guidance_scale, trained.num_classes, shape[0])
    keep = trained.datamodule.trajectory_examples
    starts = range(0, num_samples, batch_size)
    rank, size = world()
    if size > 1 and rank == 0:
        log.info(f"sampling {len(starts)} batches on {size} processes")
    done = []
    for index, start in my_share(starts):  # every process its share, when torchrun started many
        x, marked = run_sampler(
            sampler,
            diffusion,
            model,
            (min(batch_size, num_samples - start), *shape),
            torch.Generator().manual_seed(batch_seed(seed, index)),
            clip_denoised,
            trajectory_points if start == 0 else 0,
            keep,
            progress=True,
            **batch_labels(labels, index, batch_size, device),
        )
        done.append((index, (x.cpu(), marked)))
    batches = gather_in_order(done)
    return torch.cat([x for x, _ in batches]), batches[0][1]


@torch.no_grad()
def run_sampler(
    sampler: Sampler,
    diffusion: GaussianDiffusion,
    backbone: torch.nn.Module,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    clip_denoised: bool,
    trajectory_points: int = 0,
    trajectory_examples: int = 8,
    progress: bool = False,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, Trajectory]:
    """Sample once from x_T, the generator's first draw (on its device, moved to the chain's):
    x_0, and (t, x_t, predicted x_0) of the first `trajectory_examples` samples at
    `trajectory_points` of the sampler's steps evenly spread (t on the trained chain).
    `model_kwargs` go to every network call (y: the samples' labels)."""
    K = len(sampler.timesteps(diffusion))
    marks = set(np.linspace(0, K - 1, trajectory_points).round().astype(int))
    x_T = initial_noise(shape, generator, diffusion.betas.device)
    trajectory = []
    steps = sampler.iterate(
        backbone, diffusion, x_T, generator, clip_denoised, progress, **model_kwargs
    )
    for j, (t, x, pred_x0) in enumerate(steps):
        if j in marks:
            keep = trajectory_examples
            trajectory.append((t, x[:keep].cpu(), pred_x0[:keep].cpu()))
    return x, trajectory
