"""DiffusionModule: the LightningModule that trains the network with the diffusion's objective;
its metrics."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torch import nn

from ddpm.checks import check_choice, check_int
from ddpm.conditioning import conditioning_of, drop_labels, label_rows
from ddpm.diffusion import GaussianDiffusion, ImportanceTimesteps
from ddpm.samplers import Ancestral, Sampler
from ddpm.sampling import Trajectory, run_sampler
from ddpm.truth import conditional_loss_floor, loss_floor

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
TIMESTEP_SAMPLINGS = ("uniform", "importance")


def is_logged_step(trainer: pl.Trainer, step: int) -> bool:
    """Whether Lightning writes the values logged in training step `step` (0-based) to the
    loggers: every `log_every_n_steps`-th step, counting from 1, and the last step (where
    `DiffusionModule` stops the trainer, which makes Lightning write)."""
    return (step + 1) % trainer.log_every_n_steps == 0 or step + 1 == trainer.max_steps


def linear_warmup(warmup_steps: int, step: int) -> float:
    """Learning-rate factor: rises linearly to 1 over the first `warmup_steps` steps."""
    return min(1.0, (step + 1) / warmup_steps)


class DiffusionModule(pl.LightningModule):
    """Trains `backbone` with `diffusion`'s objective (`GaussianDiffusion.training_terms`), t
    drawn uniformly or by importance (`timestep_sampling`); samples with the weights it holds.

    During validation and after `fit`, Lightning's EMAWeightAveraging has swapped the EMA weights
    in, and a checkpoint's `state_dict` holds them, so `sample()` then uses the EMA weights.

    `backbone`, `diffusion` and `optimizer` left out are built from `run_config` (the run's
    resolved config) through its `_target_` nodes; that is how Lightning's
    `DiffusionModule.load_from_checkpoint(path)` rebuilds a trained module.

    With `conditioning=class` in `run_config` the batches are (x, y): the network sees the labels,
    each replaced by the null label with probability `conditioning.drop_prob` in training (one
    draw per example from the training's random state, so resumes stay exact).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        diffusion: GaussianDiffusion | None = None,
        optimizer: OptimizerFactory | None = None,
        warmup_steps: int = 0,
        timestep_sampling: str = "uniform",
        clip_denoised: bool = True,
        val_bpd_every: int = 0,
        val_bpd_batches: int = 1,
        loss_floor_samples: int = 256,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_int("model.warmup_steps", warmup_steps, minimum=0)
        check_int("model.val_bpd_every", val_bpd_every, minimum=0)
        check_int("model.val_bpd_batches", val_bpd_batches, minimum=0)
        check_int("model.loss_floor_samples", loss_floor_samples, minimum=0)
        check_choice("loss.timesteps", timestep_sampling, TIMESTEP_SAMPLINGS)
        if None in (backbone, diffusion, optimizer):
            if run_config is None:
                raise ValueError(
                    "DiffusionModule needs backbone, diffusion and optimizer, or the run_config "
                    "of a run to build them from."
                )
            backbone = backbone or instantiate(run_config["backbone"])
            diffusion = diffusion or instantiate(run_config["diffusion"])
            optimizer = optimizer or instantiate(run_config["model"]["optimizer"])
        self.num_validations = 0  # completed validations, for val_bpd_every
        # `run_config` is the run's resolved config (plain containers): it goes into every
        # checkpoint and to the loggers as the run's config.
        self.save_hyperparameters(ignore=["backbone", "diffusion", "optimizer"])
        self.backbone = backbone
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        # loss.timesteps=importance: the loss history per t, kept in checkpoints
        self.importance = (
            ImportanceTimesteps(diffusion.num_timesteps)
            if timestep_sampling == "importance"
            else None
        )
        # train/loss_q0..q3 sums and counts since the last logged step: a plain tensor, not a
        # buffer, so that DDP does not broadcast it, nor a checkpoint keep it
        self.quarter_stats: torch.Tensor | None = None
        # the simple loss's floor per t, float32 [T], for data with a known distribution
        self.loss_floor: torch.Tensor | None = None
        self.loss_floor_samples = loss_floor_samples
        self.num_classes, self.drop_prob = conditioning_of(run_config)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's output at (x_t, t) (and labels y): its prediction (and variance
        values)."""
        return self.backbone(x, t) if y is None else self.backbone(x, t, y=y)

    def _labels(self, batch: tuple[torch.Tensor, ...], drop: bool = False) -> dict[str, Any]:
        """The network's keyword arguments for a batch: {y: labels} for a conditional run (with
        `drop`, each replaced by the null label with probability drop_prob), else none."""
        if self.num_classes is None:
            return {}
        y = batch[1]
        return {"y": drop_labels(y, self.num_classes, self.drop_prob) if drop else y}

    def training_step(
        self, batch: tuple[torch.Tensor, ...], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """The objective on the batch; the per-example losses and t go out with it, for the
        callbacks (the NaN guard reads them). With importance sampling the batch's mean weights
        each loss by 1 / (T p_t), and every process's losses join the history."""
        x0 = batch[0]
        if self.importance is None:
            t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        else:
            t, weights = self.importance.sample(x0.shape[0], x0.device)
        labels = self._labels(batch, drop=True)
        terms = self.diffusion.training_terms(
            self.backbone, x0, t, num_levels=self._num_levels(), **labels
        )
        losses = terms["loss"]
        if self.importance is None:
            loss = losses.mean()
        else:
            loss = (losses * weights).mean()
            # [2, B] from each process: t (exact as a float) and the losses, in rank order
            gathered = self.all_gather(torch.stack([t.to(losses.dtype), losses.detach()]))
            all_t, all_losses = gathered.reshape(-1, 2, len(t)).transpose(0, 1).flatten(1)
            self.importance.update(all_t.long(), all_losses)
        self._add_to_quarters(losses.detach(), t, terms.get("mse"))
        if self._logs_now():  # self.log costs ~2 ms on the host (and a collective with DDP)
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
            if len(terms) == 3:  # the loss and both its parts
                self.log("train/mse", terms["mse"].mean(), sync_dist=True)
                self.log("train/vb", terms["vb"].mean(), sync_dist=True)
            self._log_quarters()
        return {"loss": loss, "losses": losses.detach(), "t": t}

    def _num_levels(self) -> int | None:
        """The data's number of levels, for L_0's discretised decoder (None: continuous data)."""
        return getattr(getattr(self.trainer, "datamodule", None), "num_levels", None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the last step, stop the trainer: Lightning then writes that step's logs and runs
        a validation (val/loss, the sample grid, checkpoints) even when `val_check_interval` does
        not fall on it, so every run, however short, ends validated."""
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def _logs_now(self) -> bool:
        """Whether Lightning sends this training step's logged values to the loggers."""
        return is_logged_step(self.trainer, self.global_step)

    def _add_to_quarters(
        self, losses: torch.Tensor, t: torch.Tensor, mse: torch.Tensor | None = None
    ) -> None:
        """Add the batch to the sums per quarter of [0, T), on the device (no host sync): the
        (unweighted) loss, the count and, where the floor is known, the simple loss minus it."""
        if self.quarter_stats is None:
            self.quarter_stats = torch.zeros(3, 4, device=losses.device)
        quarter = t * 4 // self.diffusion.num_timesteps
        self.quarter_stats[0].index_add_(0, quarter, losses.float())
        self.quarter_stats[1].index_add_(0, quarter, torch.ones_like(losses, dtype=torch.float32))
        if self.loss_floor is not None and mse is not None:
            excess = mse.detach().float() - self.loss_floor[t]
            self.quarter_stats[2].index_add_(0, quarter, excess)

    def _log_quarters(self) -> None:
        """`train/loss_q0..q3`: the loss over the examples whose t lies in each quarter of
        [0, T), averaged since the last logged step (as improved-diffusion logs them), and for
        data with a known distribution `train/excess_loss_q0..q3`, the simple loss minus its
        floor (`ddpm.truth.loss_floor`); with several processes, rank 0's share. The window then
        starts again."""
        sums, counts, excess = self.quarter_stats  # a quarter with no t gives nan
        for q in range(4):
            self.log(f"train/loss_q{q}", sums[q] / counts[q], rank_zero_only=True)
            if self.loss_floor is not None:
                self.log(f"train/excess_loss_q{q}", excess[q] / counts[q], rank_zero_only=True)
        self.quarter_stats.zero_()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`train/grad_norm`: the global 2-norm of the gradients before clipping, on logged
        steps only."""
        if self._logs_now():
            grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), rank_zero_only=True)

    def _fixed_noise_loss(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The objective (t uniform, unweighted) with t and noise drawn from a generator seeded by
        the batch and rank, so that evaluations at different steps compare the same terms (a
        conditional run's given the labels)."""
        x0 = batch[0]
        seed = batch_idx * self.trainer.world_size + self.trainer.global_rank
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        losses = self.diffusion.training_loss(
            self.backbone, x0, t, noise, self._num_levels(), **self._labels(batch)
        )
        return losses.mean()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch[0].shape[0])
        if self._bpd_due(batch_idx):
            generator = torch.Generator().manual_seed(batch_idx)
            num_levels = self.trainer.datamodule.num_levels
            bpd = self.diffusion.nll_bpd(
                self.backbone, batch[0], num_levels, generator, self.hparams.clip_denoised,
                **self._labels(batch),
            )  # fmt: skip
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

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.num_validations += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["num_validations"] = self.num_validations  # val_bpd_every's count, on resume
        if self.importance is not None:
            checkpoint["importance_timesteps"] = self.importance.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.num_validations = checkpoint.get("num_validations", 0)
        if self.importance is not None and "importance_timesteps" in checkpoint:
            self.importance.load_state_dict(checkpoint["importance_timesteps"])

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss = self._fixed_noise_loss(batch, batch_idx)
        self.log("test/loss", loss, sync_dist=True, batch_size=batch[0].shape[0])

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw `num_samples` examples with the ancestral sampler (Algorithm 2, all T steps)."""
        return self.sample_with_trajectory(num_samples, generator)[0]

    @torch.no_grad()
    def sample_with_trajectory(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        points: int = 0,
        trajectory_examples: int = 8,
        sampler: Sampler | None = None,
        per_class: int = 0,
    ) -> tuple[torch.Tensor, Trajectory]:
        """Samples by `sampler` (None: ancestral, all T steps), and (t, x_t, predicted x_0) of
        the first `trajectory_examples` at `points` of its steps (`ddpm.sampling.run_sampler`),
        with the backbone in eval mode. A conditional model with `per_class` draws that many of
        each class in turn (`num_samples` is then ignored; 0: the null label, unconditional)."""
        was_training = self.backbone.training
        self.backbone.eval()
        labels = {}
        if self.num_classes is not None and per_class:
            y = label_rows(list(range(self.num_classes)), per_class).to(self.device)
            num_samples, labels = len(y), {"y": y}
        try:
            return run_sampler(
                sampler or Ancestral(),
                self.diffusion,
                self.backbone,
                (num_samples, *self.backbone.data_shape),
                generator,
                self.hparams.clip_denoised,
                trajectory_points=points,
                trajectory_examples=trajectory_examples,
                **labels,
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
        self._compute_loss_floor()
        if self.importance is not None:
            self.importance.to(self.device)  # its history lives beside the losses
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

    def _compute_loss_floor(self) -> None:
        """For data whose distribution is known (`distribution()` of the data module) and an
        objective with a simple-loss part, the floor of that part per t (a conditional run's given
        its labels, `conditional_loss_floor`), by Monte Carlo with
        `loss_floor_samples` draws per t from a generator of its own (the run's random state is
        untouched, so resumes stay exact)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        distribution = datamodule.distribution() if datamodule is not None else None
        if distribution is None or self.diffusion.loss == "vlb" or not self.loss_floor_samples:
            return
        generator = torch.Generator().manual_seed(0)
        if self.num_classes is None:
            floor, _ = loss_floor(self.diffusion, distribution, self.loss_floor_samples, generator)
        else:  # given the labels, each dropped at drop_prob
            floor = conditional_loss_floor(
                self.diffusion, distribution, self.drop_prob, self.loss_floor_samples, generator
            )
        self.loss_floor = floor.float().to(self.device)
