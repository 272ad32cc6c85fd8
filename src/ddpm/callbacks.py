"""Lightning callbacks: sample grids (images) or scatter plots (2-D data) at each validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torchvision.utils import make_grid


def image_grid(samples: torch.Tensor, min_side: int = 32, nrow: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> a uint8 [H', W', 3] grid of `nrow` per row (default: square);
    small images are upscaled with nearest-neighbour so that each is at least `min_side` wide."""
    scale = max(1, math.ceil(min_side / samples.shape[-1]))
    x = F.interpolate((samples.float().clamp(-1, 1) + 1) / 2, scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(len(x)))
    grid = make_grid(x, nrow=nrow, padding=scale, pad_value=0.5)
    return (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()


def scatter_plot(samples: torch.Tensor, data: torch.Tensor, title: str = "") -> np.ndarray:
    """A uint8 [H, W, 3] scatter plot of 2-D samples over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, data = samples.float().cpu().numpy(), data.float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(data[:, 0], data[:, 1], s=3, c="0.75", label="data", linewidths=0)
    ax.scatter(samples[:, 0], samples[:, 1], s=3, c="tab:orange", label="samples", linewidths=0)
    low, high = data.min(0), data.max(0)
    pad = 0.1 * (high - low)
    ax.set(xlim=(low[0] - pad[0], high[0] + pad[0]), ylim=(low[1] - pad[1], high[1] + pad[1]))
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def log_image(trainer: pl.Trainer, key: str, image: np.ndarray) -> None:
    """Send an [H, W, 3] uint8 image to every logger that takes images (wandb, TensorBoard)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")


class SampleGrid(pl.Callback):
    """At each validation, sample with a fixed seed and save `dirpath/step_XXXXXXX.png`.

    Sampling happens at the first validation batch: by then Lightning's EMAWeightAveraging has
    swapped the EMA weights in (at validation epoch start), whatever the order of the callbacks.
    Only global rank 0 samples and writes.
    """

    def __init__(self, dirpath: str, num_samples: int = 64, seed: int = 0) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(
                f"callbacks.samples.num_samples={num_samples!r} is invalid: "
                "it must be an integer >= 1."
            )
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.seed = seed

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        if not trainer.is_global_zero:
            return
        generator = torch.Generator().manual_seed(self.seed)
        samples = pl_module.sample(self.num_samples, generator=generator)
        step = trainer.global_step
        if samples.ndim == 4:
            image = image_grid(samples)
        else:
            image = scatter_plot(samples, trainer.datamodule.val_data, title=f"step {step}")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(self.dirpath / f"step_{step:07d}.png")
        log_image(trainer, "samples", image)


class RandomState(pl.Callback):
    """Keeps the global torch random state (and CUDA's) in checkpoints and puts it back just
    before the first training step after a resume, so that the t and noise of every step are
    those of the uninterrupted run. Lightning restores weights, EMA, optimizer, loops and a
    stateful loader's position, but not this state.

    With DDP the checkpoint holds rank 0's state, which every rank gets back.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_state"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.pending = checkpoint.get("rng_state")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pending is None:
            return
        torch.set_rng_state(self.pending["torch"])
        if self.pending["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.pending["cuda"])
        self.pending = None


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging, keeping the raw weights in checkpoints saved after training.

    At the end of fit, EMAWeightAveraging copies the EMA weights into the module; a checkpoint
    saved after that (ModelCheckpoint's end-of-training `last.ckpt`, which runs after every other
    callback) would then hold the EMA weights as the raw ones too, and a run continued from it
    would lose its raw weights. This keeps a copy of the raw weights for such checkpoints.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw_state: dict[str, torch.Tensor] | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.raw_state is not None:
            checkpoint["current_model_state"] = self.raw_state
