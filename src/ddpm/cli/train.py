"""`python train.py` / `ddpm-train`: build everything from the Hydra config, check it, then fit."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError

from ddpm.backbones import compile_backbone, set_matmul_precision
from ddpm.callbacks import NanGuard, NonFiniteLossError
from ddpm.checkpoint import ORACLE_TARGET, check_same_model, read_checkpoint
from ddpm.cli.common import CONF_DIR, quiet_known_noise, user_errors
from ddpm.diffusion import output_channels
from ddpm.loggers import finish_wandb, guard_logger
from ddpm.module import DiffusionModule

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What `build` makes from a config: everything `trainer.fit` needs."""

    datamodule: pl.LightningDataModule
    module: DiffusionModule
    trainer: pl.Trainer
    ckpt_path: str | None = None


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate each `_target_` entry of a dict of named entries (null entries are skipped)."""
    return [instantiate(v) for v in (node or {}).values() if v is not None]


def _check_config(cfg: DictConfig) -> None:
    """Checks that need the config rather than one object."""
    lr = cfg.model.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"model.optimizer.lr={lr!r} is invalid: it must be a number > 0.")
    decay = OmegaConf.select(cfg, "callbacks.ema.decay")
    if decay is not None and not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ValueError(f"callbacks.ema.decay={decay!r} is invalid: it must lie in [0, 1].")


def _check_output_channels(backbone: torch.nn.Module, diffusion: Any, shape: tuple) -> None:
    """The backbone's output must have the channels the variance needs (2C when learned): one
    forward pass on one zero example, in eval mode (no dropout draws from the random state)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        got = backbone(torch.zeros(1, *shape), torch.zeros(1, dtype=torch.long)).shape[1]
    backbone.train(was_training)
    needed = output_channels(shape[0], diffusion.variance)
    if got != needed:
        raise ValueError(
            f"backbone={_choice('backbone')} outputs {got} channel(s) but variance="
            f"{diffusion.variance} needs {needed} for data with {shape[0]} channel(s): leave "
            "backbone.out_channels (backbone.out_dim for the MLP) to the config's interpolation."
        )


def build(cfg: DictConfig) -> Run:
    """Instantiate data, diffusion, backbone, module, callbacks, loggers and trainer, and check
    that they fit together; every user error is a ValueError naming the key."""
    _check_config(cfg)
    set_matmul_precision(cfg.get("matmul_precision"))
    pl.seed_everything(cfg.seed, workers=True)
    if OmegaConf.select(cfg, "backbone._target_") == ORACLE_TARGET:
        raise ValueError(
            "backbone=oracle has no weights to train: it is the Bayes-optimal network, for "
            "ddpm-sample, ddpm-eval and ddpm-truth (e.g. ddpm-sample backbone=oracle data=gmm)."
        )
    datamodule = instantiate(cfg.data)
    diffusion = instantiate(cfg.diffusion)
    try:
        backbone = instantiate(cfg.backbone)
    except InterpolationKeyError as error:
        raise ValueError(
            f"backbone={_choice('backbone')} does not fit data={_choice('data')}: it reads a key "
            f"the data config lacks ({error}); 2-D data takes backbone=mlp (experiment=toy2d)."
        ) from error
    if tuple(backbone.data_shape) != tuple(datamodule.data_shape):
        raise ValueError(
            f"backbone={_choice('backbone')} takes examples of shape {tuple(backbone.data_shape)} "
            f"but data={_choice('data')} has shape {tuple(datamodule.data_shape)}: the backbone's "
            "channels and size (backbone.in_channels, backbone.image_size, backbone.dim) "
            "must match the data's."
        )
    _check_output_channels(backbone, diffusion, tuple(datamodule.data_shape))
    compile_backbone(backbone, cfg.get("compile"))
    datamodule.check()  # data files present (a missing folder is one sentence, not a traceback)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resume_path(cfg)
    if ckpt_path:
        check_same_model(run_config, read_checkpoint(ckpt_path), ckpt_path)
    make_module = instantiate(cfg.model, _partial_=True)  # run_config must not be instantiated
    module = make_module(backbone=backbone, diffusion=diffusion, run_config=run_config)
    trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=[guard_logger(lg) for lg in _instantiate_all(cfg.get("logger"))] or False,
    )
    datamodule.check_training_batches(trainer.world_size)  # also loads the splits
    _check_not_ddp_in_local_sweep(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, NanGuard):
            callback.check_processes(trainer.world_size)
    num_params = sum(p.numel() for p in backbone.parameters())
    log.info(f"backbone {_choice('backbone')}: {num_params:,} parameters ({num_params / 1e6:.1f}M)")
    return Run(datamodule, module, trainer, ckpt_path)


def _check_not_ddp_in_local_sweep(trainer: pl.Trainer) -> None:
    """Lightning's DDP starts its other processes by re-running the command line, which inside a
    local multirun would start the whole sweep again in each; refuse that before training."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if trainer.world_size == 1 or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    local = hydra_cfg.launcher.get("_target_", "").endswith("BasicLauncher")
    if hydra_cfg.mode == RunMode.MULTIRUN and local:
        raise ValueError(
            f"trainer={_choice('trainer')} with {trainer.world_size} processes cannot run inside a "
            "local multirun (-m): Lightning's DDP starts its processes by re-running the command, "
            "which would repeat the sweep; use hydra/launcher=slurm (one SLURM task per GPU), or "
            "run the jobs one at a time without -m."
        )


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path`, or with `ckpt_path=auto` the run folder's
    checkpoints/last.ckpt when there is one (None: start afresh)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path != "auto":
        return ckpt_path
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info(f"ckpt_path=auto: resuming from {last}")
        return str(last)
    log.info("ckpt_path=auto: no checkpoints/last.ckpt in the run folder yet, starting afresh")
    return None


def _choice(group: str) -> str:
    """The option chosen for a config group in this Hydra run ('?' outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "?"
    return str(HydraConfig.get().runtime.choices.get(group, "?"))


def train(cfg: DictConfig) -> dict[str, float]:
    """Build and fit; return the final callback metrics (e.g. `val/loss`) as floats."""
    with user_errors():  # configuration errors end here, in one sentence, before training
        run = build(cfg)
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    except NonFiniteLossError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_wandb(run.trainer.loggers)
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    log.info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    log.info(f"outputs (checkpoints, samples, logs) in {cfg.paths.output_dir}")
    return metrics


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The final value of `optimized_metric`, what train.py returns to a sweeper. Only a sweeper
    that optimises (e.g. hparams_search=optuna) needs it: there a metric the run never logged is
    one sentence naming what it did log; elsewhere the run ends normally."""
    key = cfg.get("optimized_metric")
    if key in metrics or not _sweeper_optimises():
        return metrics.get(key)
    logged = ", ".join(sorted(metrics)) or "none (this run logged no metrics)"
    with user_errors():
        raise ValueError(
            f"optimized_metric={key!r} was not logged by this run: allowed are {logged}."
        )
    return None


def _sweeper_optimises() -> bool:
    """Whether this job runs under a sweeper that reads its return value (not Hydra's basic
    sweeper, which only runs the grid)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return not HydraConfig.get().sweeper.get("_target_", "").endswith("BasicSweeper")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the final `optimized_metric` (what a sweeper optimises)."""
    quiet_known_noise()
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
