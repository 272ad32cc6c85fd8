"""Lightning callbacks: what a run shows (sample grids, trajectories, the schedule, images per
second), what it keeps for an exact resume (random state, raw weights beside the EMA), and what
it does about a non-finite loss (the NaN guard)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from PIL import Image
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddpm.checks import check_int
from ddpm.figures import schedule_figure
from ddpm.module import is_logged_step
from ddpm.samplers import Ancestral
from ddpm.sampling import build_sampler

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")


def log_image(trainer: pl.Trainer, key: str, image: np.ndarray) -> None:
    """Send an [H, W, 3] uint8 image to every logger that takes images (wandb, TensorBoard)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, trainer.global_step, dataformats="HWC")


def save_and_log(trainer: pl.Trainer, path: Path, key: str, image: np.ndarray) -> None:
    """Write `image` to `path` (a PNG) and send it to the loggers that take images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    log_image(trainer, key, image)


class SampleGrid(pl.Callback):
    """At each validation, sample with a fixed seed and save `dirpath/step_XXXXXXX.png` (for a
    conditional run, one row per class); at every
    `trajectory_every`-th validation also the denoising trajectory (x_t and the predicted x_0 at
    10 times along the chain) as `dirpath/trajectory_XXXXXXX.png` (0: never).

    With `score` (image data) the samples are scored too: FID and KID against the training
    split in the features `ddpm-eval` uses (`ddpm.metrics.score_features`, the data's small
    classifier cached under `cache_dir` for small images), logged as `val/fid` and `val/kid`
    beside their floor at the same number of images (`val/fid_floor`, `val/kid_floor`).

    Sampling happens at the first validation batch: by then Lightning's EMAWeightAveraging has
    swapped the EMA weights in (at validation epoch start), whatever the order of the callbacks.
    Only global rank 0 samples and writes.
    """

    def __init__(
        self,
        dirpath: str,
        num_samples: int = 64,
        seed: int = 0,
        trajectory_every: int = 0,
        score: bool = False,
        cache_dir: str = "data",
        sampler: Any = None,
    ) -> None:
        check_int("callbacks.samples.num_samples", num_samples)
        self.sampler = build_sampler(sampler or Ancestral(), "callbacks.samples.sampler")
        check_int("callbacks.samples.trajectory_every", trajectory_every, minimum=0)
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.seed = seed
        self.trajectory_every = trajectory_every
        self.validations = 0
        self.score, self.cache_dir = bool(score), cache_dir
        self._features: torch.nn.Module | None = None

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
        self.validations += 1
        if not trainer.is_global_zero:
            return
        every = self.trajectory_every
        points = 10 if every and (self.validations - 1) % every == 0 else 0
        generator = torch.Generator().manual_seed(self.seed)
        data = trainer.datamodule
        # a conditional run: one row per class, num_samples // num_classes (at least 1) each
        classes = getattr(pl_module, "num_classes", None)
        per_class = max(1, self.num_samples // classes) if classes else 0
        samples, trajectory = pl_module.sample_with_trajectory(
            self.num_samples, generator, points, data.trajectory_examples, self.sampler, per_class
        )
        step = trainer.global_step
        image = data.show(samples, title=f"step {step}", per_row=per_class or None)
        save_and_log(trainer, self.dirpath / f"step_{step:07d}.png", "samples", image)
        if trajectory:
            path = self.dirpath / f"trajectory_{step:07d}.png"
            save_and_log(trainer, path, "trajectory", data.show_trajectory(trajectory))
        if self.score and "fid" in data.scores:
            self._log_score(pl_module, samples)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The score's feature network, ready before validation (which runs without autograd,
        so a classifier could not be trained there); the training's random state is left as it
        was, so that a run with a score draws what one without draws."""
        if self.score and trainer.is_global_zero and "fid" in trainer.datamodule.scores:
            from ddpm.metrics import score_features

            with torch.random.fork_rng(devices=[]):
                self._features, _ = score_features(trainer.datamodule, "auto", None, self.cache_dir)

    def _log_score(self, pl_module: pl.LightningModule, samples: torch.Tensor) -> None:
        from ddpm.metrics import fid_kid, held_out_images

        data = pl_module.trainer.datamodule
        if self._features is None:
            return  # score_features said why, once
        device = samples.device
        scores = fid_kid(
            samples, data.train_data, held_out_images(data, "train"),
            self._features.to(device), 256, str(device), self.seed,
        )  # fmt: skip
        for key in ("fid", "fid_floor"):
            pl_module.log(f"val/{key}", scores[key], rank_zero_only=True)
        pl_module.log("val/kid", scores["kid_mean"], rank_zero_only=True)
        pl_module.log("val/kid_floor", scores["kid_floor_mean"], rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}  # so a resumed run keeps the trajectory cadence

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict["validations"]


class SchedulePlot(pl.Callback):
    """At the start of training, plot abar_t, log-SNR and sigma_t^2 against t for the run's
    schedule and variance: `path` (a PNG) and the loggers' `schedule` image."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        diffusion = pl_module.diffusion
        title = f"T = {diffusion.num_timesteps}, sigma_t^2 = {diffusion.variance}"
        save_and_log(trainer, self.path, "schedule", schedule_figure(diffusion, title))


class Throughput(pl.Callback):
    """Logs `train/images_per_sec`: training images (all processes) per second of wall time,
    over the steps since the last log; validation time is left out.

    Lightning's ThroughputMonitor synchronises CUDA after every step; this measures over the
    logging window instead, which needs no synchronisation (the queue of launched GPU work is
    short next to a window of `log_every_n_steps` steps).
    """

    def __init__(self) -> None:
        self.started: float | None = None
        self.images = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.started is None:
            self.started, self.images = time.perf_counter(), 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.started is None:
            return
        self.images += len(batch[0]) * trainer.world_size
        if is_logged_step(trainer, trainer.global_step - 1):  # the step just done
            rate = self.images / (time.perf_counter() - self.started)
            pl_module.log("train/images_per_sec", rate, rank_zero_only=True)
            self.started = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = None  # a new window after validation


class RandomState(pl.Callback):
    """Keeps each process's global torch random state (and its CUDA device's) in checkpoints and
    puts it back just before the first training step after a resume, so that the t and noise of
    every step are those of the uninterrupted run. Lightning restores weights, EMA, optimizer,
    loops and a stateful loader's position, but not this state.

    With several processes the states of all ranks are gathered into the checkpoint (which rank 0
    writes) and each rank gets its own back. Resuming with another number of processes cannot
    be exact: each rank then takes the state of rank `rank % saved`, with a warning.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every rank builds the checkpoint (only rank 0 writes it), so all take part in the gather.
        states = {"torch": torch.get_rng_state()}
        if pl_module.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(pl_module.device)
        checkpoint["rng_state"] = {
            # clone: each rank's row becomes a tensor of its own, not a view into the gather
            key: [s.cpu().clone() for s in self._gather(trainer, pl_module, state)]
            for key, state in states.items()
        }

    @staticmethod
    def _gather(
        trainer: pl.Trainer, pl_module: pl.LightningModule, state: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each rank's copy of `state` (a uint8 tensor of the same length on every rank)."""
        if trainer.world_size == 1:
            return [state]
        gathered = trainer.strategy.all_gather(state.to(pl_module.device))
        return list(gathered.unbind(0))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.pending = checkpoint.get("rng_state")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pending is None:
            return
        saved = len(self.pending["torch"])
        if saved != trainer.world_size:
            rank_zero_warn(
                f"the checkpoint holds the random state of {saved} process(es) and this run has "
                f"{trainer.world_size}: the resumed steps draw other t and noise than the "
                "uninterrupted run would have."
            )
        rank = trainer.global_rank % saved
        torch.set_rng_state(self.pending["torch"][rank].clone())
        if "cuda" in self.pending and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(self.pending["cuda"][rank].clone(), pl_module.device)
        self.pending = None


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging, with three changes:

    - The update is one `torch._foreach_lerp_` per device and dtype (torch's
      `get_ema_multi_avg_fn`) rather than EMAWeightAveraging's loop over the parameters, which
      cost about as much as the optimizer step (benchmarks/run.py).
    - The count of updates is kept on the host as well: AveragedModel.update_parameters reads its
      device counter back twice per update (`bool(n_averaged == 0)`), which makes a GPU wait
      at every step. The counter is still kept in the averaged model, for checkpoints.
    - It keeps the raw weights in checkpoints saved after training. At the end of fit,
      EMAWeightAveraging copies the EMA weights into the module; a checkpoint saved after that
      (ModelCheckpoint's end-of-training `last.ckpt`, which runs after every other callback)
      would then hold the EMA weights as the raw ones too, and a run continued from it would
      lose its raw weights.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self._kwargs.pop("avg_fn")  # what AveragedModel gets: the foreach form instead
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)
        self.raw_state: dict[str, torch.Tensor] | None = None
        self.updates = 0  # the averaged model's n_averaged, on the host

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            # every update EMAWeightAveraging makes (per step or per epoch) goes through ours
            self._average_model.update_parameters = self.update
        self._read_updates()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._read_updates()

    def _read_updates(self) -> None:
        if self._average_model is not None:
            self.updates = int(self._average_model.n_averaged)

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        """The averaged model's `update_parameters`: a copy of the weights the first time, then
        ema = decay * ema + (1 - decay) * w, as AveragedModel's own does it."""
        averaged = self._average_model
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for mine, theirs in zip(
            self._tensors(averaged.module), self._tensors(pl_module), strict=True
        ):
            ours, current = groups.setdefault((mine.device, mine.dtype), ([], []))
            ours.append(mine.detach())
            current.append(theirs.detach().to(mine.device))
        for ours, current in groups.values():
            if self.updates == 0 or not ours[0].is_floating_point():  # e.g. integer buffers
                torch._foreach_copy_(ours, current)
            else:
                self._kwargs["multi_avg_fn"](ours, current, None)
        averaged.n_averaged += 1
        self.updates += 1

    def _tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """What is averaged: the parameters, and the buffers with `use_buffers`."""
        return [*module.parameters(), *(module.buffers() if self._use_buffers else ())]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.raw_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.raw_state is not None:
            checkpoint["current_model_state"] = self.raw_state


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where."""


class NanGuard(pl.Callback):
    """What a NaN or infinite training loss does: `on_nan=stop` (the default) ends the run with
    one line naming the first such batch, and nothing is saved over the last good checkpoint;
    `on_nan=skip` skips such batches (no optimizer step) and counts them in
    `train/skipped_batches`.

    It reads the per-example losses and t that `DiffusionModule.training_step` returns. Under
    `stop` it keeps (step, first and last bad t, loss) of the first bad batch on the device, so
    the step reads nothing back (which would stall a GPU every step), and raises at the next
    logged step, at validation, before every checkpoint and at the end of training. `skip` must
    decide before the optimizer step, so it reads the loss back every step, and it works in one
    process only (a skipped step on one rank would stall the others).
    """

    def __init__(self, on_nan: str = "stop") -> None:
        if on_nan not in NAN_POLICIES:
            raise ValueError(
                f"callbacks.nan_guard.on_nan={on_nan!r} is unknown: allowed are 'stop' and 'skip'."
            )
        self.on_nan = on_nan
        self.first: torch.Tensor | None = None  # step -1: no bad batch yet
        self.skipped = 0

    def check_processes(self, world_size: int) -> None:
        """Refuse `skip` with several processes (called before training starts)."""
        if self.on_nan == "skip" and world_size > 1:
            raise ValueError(
                "callbacks.nan_guard.on_nan=skip works in one process only (a skipped step on one "
                f"rank would stall the others); with {world_size} processes use on_nan=stop."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.on_nan != "skip":
            return
        training_step = pl_module.training_step

        def skipping_step(batch: Any, batch_idx: int) -> Any:
            # Lightning takes no optimizer step for a batch whose training_step returns None.
            out = training_step(batch, batch_idx)
            if torch.isfinite(out["loss"]):
                return out
            self.skipped += 1
            log.warning(
                f"{self._report(out['losses'], out['t'], trainer.global_step, pl_module)}: "
                f"batch skipped ({self.skipped} so far)."
            )
            pl_module.log("train/skipped_batches", float(self.skipped))
            return None

        pl_module.training_step = skipping_step

    @staticmethod
    def _report(
        losses: torch.Tensor, t: torch.Tensor, step: int, pl_module: pl.LightningModule
    ) -> str:
        bad = t[~torch.isfinite(losses)]
        return (
            f"train/loss is {losses.mean().item()} at step {step} (t from {int(bad.min()) + 1} "
            f"to {int(bad.max()) + 1} of {pl_module.diffusion.num_timesteps})"
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.on_nan != "stop" or outputs is None:
            return
        losses, t = outputs["losses"], outputs["t"]
        if self.first is None:
            self.first = torch.full((4,), -1.0, dtype=torch.float64, device=losses.device)
        bad = ~torch.isfinite(losses)
        T = pl_module.diffusion.num_timesteps
        this = torch.stack(
            [
                losses.new_full((), trainer.global_step - 1, dtype=torch.float64),
                torch.where(bad, t, T).min().double(),
                torch.where(bad, t, -1).max().double(),
                losses.mean().double(),
            ]
        )
        first = (self.first[0] < 0) & bad.any()
        self.first.copy_(torch.where(first, this, self.first))
        if is_logged_step(trainer, trainer.global_step - 1):
            self.stop_if_nonfinite(trainer, pl_module)

    def stop_if_nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise NonFiniteLossError if a training loss so far (on any process) was NaN or
        infinite, naming the first such batch. A collective with several processes."""
        if self.first is None:  # no step yet, or on_nan=skip
            return
        records = pl_module.all_gather(self.first).reshape(-1, 4)
        seen = records[records[:, 0] >= 0]
        if len(seen) == 0:
            return
        step, t_min, t_max, loss = seen[seen[:, 0].argmin()].tolist()
        raise NonFiniteLossError(
            f"train/loss was {loss} at step {int(step)} (t from {int(t_min) + 1} to "
            f"{int(t_max) + 1} of {pl_module.diffusion.num_timesteps}); stopped at step "
            f"{trainer.global_step}, and the last checkpoint is the last good one "
            "(callbacks.nan_guard.on_nan=skip skips such batches instead)."
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_if_nonfinite(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.stop_if_nonfinite(trainer, pl_module)  # before anything is written

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_if_nonfinite(trainer, pl_module)
