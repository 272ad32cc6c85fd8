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

from ddpm.callbacks import image_grid, scatter_plot
from ddpm.checkpoint import Trained, load_trained_for, pick_device
from ddpm.cli import CONF_DIR, user_errors
from ddpm.diffusion import GaussianDiffusion

log = logging.getLogger(__name__)

SAMPLERS = ("ancestral", "ddim", "respaced")


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
    for key, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} is invalid: it must be an integer >= 1.")
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
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """`num_samples` samples in batches, and (t, x_t, predicted x_0) of the first batch's first
    few samples at `trajectory_points` times evenly spread along the chain."""
    chain, eta_or_none = check_sampling(
        trained.diffusion, num_samples, batch_size, sampler, steps, eta
    )
    backbone = trained.backbone.to(device)
    chain = chain.to(device)
    generator = torch.Generator().manual_seed(seed)
    marks = set(np.linspace(chain.num_timesteps - 1, 0, trajectory_points).round().astype(int))
    shape = tuple(backbone.data_shape)
    batches, trajectory = [], []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        steps_iter = chain.sample_steps(
            backbone, (n, *shape), generator, clip_denoised, progress=True, eta=eta_or_none
        )
        for i, x, pred_x0 in steps_iter:
            if start == 0 and i in marks:
                original_t = int(chain.timestep_map[i])
                keep = 8 if x.ndim == 4 else 1000  # a few images, or a cloud of 2-D points
                trajectory.append((original_t, x[:keep].cpu(), pred_x0[:keep].cpu()))
        batches.append(x.cpu())
    return torch.cat(batches), trajectory


def to_levels(x: torch.Tensor, num_levels: int) -> np.ndarray:
    """Images in [-1, 1] -> uint8 NHWC on the data's `num_levels` values 0..num_levels-1."""
    q = ((x.clamp(-1, 1) + 1) / 2 * (num_levels - 1)).round().to(torch.uint8)
    return q.permute(0, 2, 3, 1).numpy()


def trajectory_figure(trajectory: list[tuple[int, torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """The paper's progressive-generation picture: for each sample a row of x_t at the marked
    times (large t on the left), then the same rows for the predicted x_0; for 2-D data,
    scatter plots of x_t and predicted x_0 at each marked time."""
    if trajectory[0][1].ndim == 4:
        rows = []
        for index in (1, 2):  # x_t, then predicted x_0
            frames = torch.stack([step[index] for step in trajectory], dim=1)  # [N, times, ...]
            rows.append(frames.flatten(0, 1))
        return image_grid(torch.cat(rows), nrow=len(trajectory))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(trajectory), figsize=(1.6 * len(trajectory), 3.4), squeeze=False
    )
    for col, (t, x, x0) in enumerate(trajectory):
        for row, (points, label) in enumerate(((x, "x_t"), (x0, "predicted x_0"))):
            ax = axes[row, col]
            ax.scatter(points[:, 0], points[:, 1], s=2)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"t={t + 1}" if row == 0 else "", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


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
