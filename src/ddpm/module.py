"""DiffusionModule: the LightningModule that trains an eps-network with L_simple."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ddpm.checks import check_int
from ddpm.diffusion import GaussianDiffusion
from ddpm.sample import Trajectory, run_chain

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says where."""


def is_logged_step(trainer: pl.Trainer, step: int) -> bool:
    """Whether Lightning writes the values logged in training step `step` (0-based) to the
    loggers: every `log_every_n_steps`-th step, counting from 1."""
    return (step + 1) % trainer.log_every_n_steps == 0


def linear_warmup(warmup_steps: int, step: int) -> float:
    """Learning-rate factor: rises linearly to 1 over the first `warmup_steps` steps."""
    return min(1.0, (step + 1) / warmup_steps)


class DiffusionModule(pl.LightningModule):
    """Trains `backbone` as eps_theta for `diffusion`; samples with the weights it holds.

    During validation and after `fit`, Lightning's EMAWeightAveraging has swapped the EMA weights
    in, and a checkpoint's `state_dict` holds them, so `sample()` then uses the EMA weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: OptimizerFactory,
        warmup_steps: int = 0,
        clip_denoised: bool = True,
        val_bpd_every: int = 0,
        val_bpd_batches: int = 1,
        on_nan: str = "stop",
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_int("model.warmup_steps", warmup_steps, minimum=0)
        check_int("model.val_bpd_every", val_bpd_every, minimum=0)
        check_int("model.val_bpd_batches", val_bpd_batches, minimum=0)
        if on_nan not in NAN_POLICIES:
            raise ValueError(f"model.on_nan={on_nan!r} is unknown: allowed are 'stop' and 'skip'.")
        self.num_validations = 0  # completed validations, for val_bpd_every
        self.skipped_batches = 0  # batches skipped for a non-finite loss (on_nan=skip)
        # `run_config` is the run's resolved config (plain containers): it goes into every
        # checkpoint and to the loggers as the run's config.
        self.save_hyperparameters(ignore=["backbone", "diffusion", "optimizer"])
        self.backbone = backbone
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        # train/loss_q0..q3 sums and counts since the last logged step: a plain tensor, not a
        # buffer, so that DDP does not broadcast it, nor a checkpoint keep it
        self.quarter_stats: torch.Tensor | None = None
        # (step, t range, loss) of the first non-finite training batch; step -1: none yet
        self.first_nonfinite: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t)."""
        return self.backbone(x, t)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        x0 = batch[0]
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)  # kept for the NaN report
        losses = self.diffusion.training_loss(self.backbone, x0, t)
        loss = losses.mean()
        if self.hparams.on_nan == "skip":  # the one policy that reads the loss back every step
            if not torch.isfinite(loss):
                self.skipped_batches += 1
                log.warning(
                    f"{self._nonfinite_report(loss, losses, t)}: batch skipped "
                    f"({self.skipped_batches} so far)."
                )
                self.log("train/skipped_batches", float(self.skipped_batches))
                return None
        else:
            self._note_first_nonfinite(loss, losses, t)
        self._add_to_quarters(losses.detach(), t)
        if self._logs_now():  # self.log costs ~2 ms on the host (and a collective with DDP)
            self.stop_if_nonfinite()
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
            self._log_quarters()
        return loss

    def _nonfinite_report(self, loss: torch.Tensor, losses: torch.Tensor, t: torch.Tensor) -> str:
        bad = t[~torch.isfinite(losses)]
        return (
            f"train/loss is {loss.item()} at step {self.global_step} (t from "
            f"{int(bad.min()) + 1} to {int(bad.max()) + 1} of {self.diffusion.num_timesteps})"
        )

    def _note_first_nonfinite(
        self, loss: torch.Tensor, losses: torch.Tensor, t: torch.Tensor
    ) -> None:
        """Keep (step, first and last bad t, loss) of the first non-finite batch in
        `first_nonfinite`, on the device: no host sync, which would stall a GPU every step.
        `stop_if_nonfinite` reads it back on logged steps, at validation, before every checkpoint
        and at the end of training."""
        if self.first_nonfinite is None:
            self.first_nonfinite = torch.full((4,), -1.0, dtype=torch.float64, device=loss.device)
        bad = ~torch.isfinite(losses)
        T = self.diffusion.num_timesteps
        this = torch.stack(
            [
                loss.new_full((), self.global_step, dtype=torch.float64),
                torch.where(bad, t, T).min().double(),
                torch.where(bad, t, -1).max().double(),
                loss.detach().double(),
            ]
        )
        first = (self.first_nonfinite[0] < 0) & bad.any()
        self.first_nonfinite.copy_(torch.where(first, this, self.first_nonfinite))

    def stop_if_nonfinite(self) -> None:
        """Raise NonFiniteLossError if a training loss so far (on any process) was NaN or
        infinite, naming the first such batch. A collective with several processes."""
        if self.first_nonfinite is None:  # no step yet, or on_nan=skip (which checks each step)
            return
        records = self.all_gather(self.first_nonfinite).reshape(-1, 4)
        seen = records[records[:, 0] >= 0]
        if len(seen) == 0:
            return
        step, t_min, t_max, loss = seen[seen[:, 0].argmin()].tolist()
        raise NonFiniteLossError(
            f"train/loss was {loss} at step {int(step)} (t from {int(t_min) + 1} to "
            f"{int(t_max) + 1} of {self.diffusion.num_timesteps}); stopped at step "
            f"{self.global_step}, and the last checkpoint is the last good one "
            "(model.on_nan=skip skips such batches instead)."
        )

    def _logs_now(self) -> bool:
        """Whether Lightning sends this training step's logged values to the loggers."""
        return is_logged_step(self.trainer, self.global_step)

    def _add_to_quarters(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Add the batch to the sums and counts of L_simple per quarter of [0, T), on the device
        (no host sync)."""
        if self.quarter_stats is None:
            self.quarter_stats = torch.zeros(2, 4, device=losses.device)
        quarter = t * 4 // self.diffusion.num_timesteps
        self.quarter_stats[0].index_add_(0, quarter, losses.float())
        self.quarter_stats[1].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float32))

    def _log_quarters(self) -> None:
        """`train/loss_q0..q3`: L_simple over the examples whose t lies in each quarter of
        [0, T), averaged since the last logged step (as improved-diffusion logs them); with
        several processes, rank 0's share. The window then starts again."""
        means = self.quarter_stats[0] / self.quarter_stats[1]  # nan for a quarter with no t
        for q in range(4):
            self.log(f"train/loss_q{q}", means[q], rank_zero_only=True)
        self.quarter_stats.zero_()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`train/grad_norm`: the global 2-norm of the gradients before clipping, on logged
        steps only."""
        if self._logs_now():
            grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), rank_zero_only=True)

    def _fixed_noise_loss(self, x0: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """L_simple with t and noise drawn from a generator seeded by the batch and rank, so that
        evaluations at different steps compare the same terms."""
        seed = batch_idx * self.trainer.world_size + self.trainer.global_rank
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return self.diffusion.training_loss(self.backbone, x0, t, noise).mean()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch[0], batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        if self._bpd_due(batch_idx):
            generator = torch.Generator().manual_seed(batch_idx)
            num_levels = self.trainer.datamodule.num_levels
            bpd = self.diffusion.nll_bpd(self.backbone, batch[0], num_levels, generator)
            self.log(
                "val/bpd",
                bpd["total_bpd"].mean().float(),
                sync_dist=True,
                batch_size=batch[0].shape[0],
            )

    def _bpd_due(self, batch_idx: int) -> bool:
        """Whether this validation batch also measures the full bound (`val/bpd`): on the first
        `val_bpd_batches` batches of every `val_bpd_every`-th validation, for quantised data."""
        every = self.hparams.val_bpd_every
        return (
            every > 0
            and not self.trainer.sanity_checking
            and self.num_validations % every == 0
            and batch_idx < self.hparams.val_bpd_batches
            and getattr(self.trainer.datamodule, "num_levels", None) is not None
        )

    def on_validation_start(self) -> None:
        self.stop_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.stop_if_nonfinite()  # before anything is written over the last good checkpoint

    def on_train_end(self) -> None:
        self.stop_if_nonfinite()

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.num_validations += 1

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch[0], batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch[0].shape[0])

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `num_samples` examples with the ancestral sampler (Algorithm 2)."""
        return self.sample_with_trajectory(num_samples, generator)[0]

    @torch.no_grad()
    def sample_with_trajectory(
        self, num_samples: int, generator: torch.Generator | None = None, points: int = 0
    ) -> tuple[torch.Tensor, Trajectory]:
        """Samples, and (t, x_t, predicted x_0) of the first few at `points` times along the
        chain (`ddpm.sample.run_chain`), with the backbone in eval mode."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return run_chain(
                self.diffusion,
                self.backbone,
                (num_samples, *self.backbone.data_shape),
                generator,
                self.hparams.clip_denoised,
                trajectory_points=points,
            )
        finally:
            self.backbone.train(was_training)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.backbone.parameters())
        if not self.hparams.warmup_steps:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(linear_warmup, self.hparams.warmup_steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            # Every process was seeded alike (so the initial weights agree); from here each rank
            # draws its own t and noise, else the ranks would repeat each other's t.
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.hparams.clip_denoised and getattr(datamodule, "num_levels", 1) is None:
            warnings.warn(
                "model.clip_denoised=true clamps the predicted x_0 to [-1, 1], but the data is "
                "continuous and may lie outside it; set model.clip_denoised=false.",
                stacklevel=1,
            )
