"""`python train.py` / `ddpm-train`: build everything from the Hydra config, check it, then fit."""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Timer
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from ddpm.backbones import compile_backbone, set_channels_last, set_matmul_precision
from ddpm.callbacks import NanGuard, NonFiniteLossError, SampleGrid
from ddpm.checkpoint import (
    FINE_TUNING_MAY_CHANGE,
    ORACLE_TARGET,
    Trained,
    check_same_model,
    check_same_parameterisation,
    read_checkpoint,
)
from ddpm.checks import check_choice
from ddpm.cli.common import quiet_known_noise, user_errors
from ddpm.cli.evaluate import check_likelihood_keys, check_split, evaluate
from ddpm.conditioning import CONDITIONINGS, check_drop_prob
from ddpm.config import CONFIG_PATH, group_option
from ddpm.diffusion import output_channels
from ddpm.loggers import finish_wandb, guard_logger
from ddpm.module import DiffusionModule
from ddpm.results import config_digest, headline_metrics, read_run_results, write_run_results
from ddpm.sampling import check_guidance, check_sampling, sampler_of

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What `build` makes from a config: everything `trainer.fit` needs."""

    datamodule: pl.LightningDataModule
    module: DiffusionModule
    trainer: pl.Trainer
    ckpt_path: str | None = None


def _instantiate_all(node: DictConfig | None, key: str) -> list[Any]:
    """Instantiate each `_target_` entry of a dict of named entries (null entries are skipped);
    an entry without `_target_` is keys set for a callback or logger that was not chosen."""
    built = []
    for name, value in (node or {}).items():
        if value is None:
            continue
        if "_target_" not in value:
            raise ValueError(
                f"{key}.{name} sets {', '.join(value)} but has no _target_: {name} is not among "
                f"the chosen {key} (e.g. {key}=none); choose it (conf/{key}/{name}.yaml) or drop "
                "those keys."
            )
        built.append(instantiate(value))
    return built


def _check_config(cfg: DictConfig) -> None:
    """Checks that need the config rather than one object."""
    lr = cfg.model.optimizer.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise ValueError(f"model.optimizer.lr={lr!r} is invalid: it must be a number > 0.")
    decay = OmegaConf.select(cfg, "callbacks.ema.decay")
    if decay is not None and not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
        raise ValueError(f"callbacks.ema.decay={decay!r} is invalid: it must lie in [0, 1].")
    duration = OmegaConf.select(cfg, "callbacks.timer.duration")
    if duration is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", str(duration)):
        raise ValueError(
            f"callbacks.timer.duration={duration!r} is invalid: it must be a time DD:HH:MM:SS "
            "(e.g. 00:00:04:00 for 4 minutes of training) or null."
        )


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


def resolve_conditioning(cfg: DictConfig, datamodule: Any = None) -> None:
    """`conditioning=class`: check its keys, and fill in `conditioning.num_classes` and the
    backbone's `num_classes` from the data's classes (data without labels is refused in one
    sentence); `datamodule` (the config's data, built here when None) serves (x, y) batches from
    then on. `conditioning=none` leaves the config as it was. Done before anything reads the
    config's digest, so that a finished conditional run is recognised."""
    node = cfg.get("conditioning")
    name = node.get("name") if node else "none"
    check_choice("conditioning", name, CONDITIONINGS)
    if name == "none":
        return
    check_drop_prob(node.get("drop_prob"))
    num_classes = (datamodule or instantiate(cfg.data)).condition_on_labels()
    if node.get("num_classes") not in (None, num_classes):
        raise ValueError(
            f"conditioning.num_classes={node.num_classes!r} differs from the {num_classes} "
            f"classes of data={_choice('data')}: leave it null (it is set from the data)."
        )
    with open_dict(cfg):
        cfg.conditioning.num_classes = num_classes
        cfg.backbone.num_classes = num_classes


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
    resolve_conditioning(cfg, datamodule)  # (x, y) batches with conditioning=class
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
    set_channels_last(backbone, cfg.get("channels_last", False))
    compile_backbone(backbone, cfg.get("compile"))
    datamodule.check()  # data files present (a missing folder is one sentence, not a traceback)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resume_path(cfg)
    if ckpt_path:
        check_same_model(run_config, read_checkpoint(ckpt_path), ckpt_path)
    make_module = instantiate(cfg.model, _partial_=True)  # run_config must not be instantiated
    module = make_module(backbone=backbone, diffusion=diffusion, run_config=run_config)
    init_weights(cfg, run_config, module, ckpt_path)
    trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks"), "callbacks"),
        logger=[guard_logger(lg) for lg in _instantiate_all(cfg.get("logger"), "logger")] or False,
    )
    datamodule.check_training_batches(trainer.world_size)  # also loads the splits
    _check_not_ddp_in_local_sweep(trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, NanGuard):
            callback.check_processes(trainer.world_size)
        if isinstance(callback, SampleGrid):
            try:  # steps the trained chain cannot take
                callback.sampler.timesteps(module.diffusion)
            except ValueError as error:  # its message starts with the key
                raise ValueError(f"callbacks.samples.{error}") from error
    num_params = sum(p.numel() for p in backbone.parameters())
    log.info(f"backbone {_choice('backbone')}: {num_params:,} parameters ({num_params / 1e6:.1f}M)")
    return Run(datamodule, module, trainer, ckpt_path)


def init_weights(
    cfg: DictConfig, run_config: dict[str, Any], module: DiffusionModule, ckpt_path: str | None
) -> None:
    """`init_from=<checkpoint>`: start this run from that checkpoint's (EMA) network weights, with
    a fresh optimizer at step 0 (fine-tuning, e.g. from a model of ddpm-import). Its network and
    chain must be this config's (dropout and the loss may differ). When the run resumes from its
    own checkpoint (`ckpt_path`, or auto), that holds the weights already and init_from is not
    read again."""
    init_from = cfg.get("init_from")
    if not init_from:
        return
    if ckpt_path:
        if not _auto_resume(cfg):
            raise ValueError(
                f"init_from={init_from} and ckpt_path={ckpt_path} are both set: init_from starts "
                "a new run from a checkpoint's weights, ckpt_path resumes a run; pass one."
            )
        log.info(f"resuming from {ckpt_path}: init_from={init_from} is not read again")
        return
    checkpoint = read_checkpoint(init_from)
    check_same_model(
        run_config, checkpoint, init_from, "fine-tuning", "init_from", FINE_TUNING_MAY_CHANGE
    )
    prefix = "backbone."
    state = checkpoint["state_dict"]
    module.backbone.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    log.info(f"init_from={init_from}: the network starts from its weights (step 0, new optimizer)")


def _check_not_ddp_in_local_sweep(trainer: pl.Trainer) -> None:
    """Lightning's DDP starts its other processes by re-running the command line, which inside a
    local multirun would start the whole sweep again in each; refuse that before training."""
    if trainer.world_size == 1 or not _in_multirun():
        return
    if HydraConfig.get().launcher.get("_target_", "").endswith("BasicLauncher"):
        raise ValueError(
            f"trainer={_choice('trainer')} with {trainer.world_size} processes cannot run inside a "
            "local multirun (-m): Lightning's DDP starts its processes by re-running the command, "
            "which would repeat the sweep; use hydra/launcher=slurm (one SLURM task per GPU), or "
            "run the jobs one at a time without -m."
        )


def _in_multirun() -> bool:
    """Whether this run is a job of a Hydra multirun (-m)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _auto_resume(cfg: DictConfig) -> bool:
    """`ckpt_path=auto`, which a sweep job's `ckpt_path=null` means too: a rerun of the same sweep
    command (same hydra.sweep.dir) keeps finished jobs and continues unfinished ones."""
    ckpt_path = cfg.get("ckpt_path")
    return ckpt_path == "auto" or (ckpt_path is None and _in_multirun())


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path`, or with `ckpt_path=auto` (and in a sweep job
    without ckpt_path) the run folder's checkpoints/last.ckpt when there is one (None: start
    afresh)."""
    if not _auto_resume(cfg):
        return cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info(f"ckpt_path=auto: resuming from {last}")
        return str(last)
    log.info("ckpt_path=auto: no checkpoints/last.ckpt in the run folder yet, starting afresh")
    return None


def _choice(group: str) -> str:
    """The option chosen for a config group in this Hydra run ('?' outside one)."""
    if not HydraConfig.initialized():
        return "?"
    return str(HydraConfig.get().runtime.choices.get(group, "?"))


def finished_before(cfg: DictConfig) -> dict[str, Any] | None:
    """With `ckpt_path=auto` (or in a sweep job): the run folder's results.json when it records
    a finished run of the same config, which then is not trained again."""
    if not _auto_resume(cfg):
        return None
    record = read_run_results(cfg.paths.output_dir)
    digest = config_digest(OmegaConf.to_container(cfg, resolve=True))
    if record and record.get("config_digest") == digest:
        return record
    return None


def apply_variant(evaluation: DictConfig, keys: dict[str, Any], key_prefix: str) -> None:
    """An `eval.variants` entry's keys over the eval node, written as on ddpm-eval's command line:
    `sampler: dpm_solver` chooses that option of conf/sampler/, a dotted key (`sampler.steps: 10`)
    sets one key; a key ddpm-eval does not have is a one-sentence error."""
    sampler = keys.pop("sampler", None)
    if isinstance(sampler, str):
        evaluation.sampler = group_option("sampler", sampler, f"{key_prefix}sampler")
    elif sampler is not None:
        keys["sampler"] = sampler
    for key, value in keys.items():
        try:
            OmegaConf.update(evaluation, key, value, merge=True)
        except OmegaConfBaseException as error:
            missing = getattr(error, "full_key", None) or key
            raise ValueError(
                f"{key_prefix}{missing} is not a key of ddpm-eval (conf/eval.yaml, conf/sampler/)."
            ) from error


def eval_config(cfg: DictConfig) -> dict[str, DictConfig] | None:
    """With `eval_after_fit`: the run's `eval` node (every key of ddpm-eval, composed by Hydra from
    the same files) with the run's own last.ckpt, under the name "", and one config per
    `eval.variants` entry (its keys over that); checked now, so that a bad key or value stops the
    run before training."""
    if not cfg.get("eval_after_fit"):
        return None
    eval_keys = [k for k in cfg.eval if k != "variants"]
    asked = cfg.eval.get("variants")
    variants = {"": {}, **(OmegaConf.to_container(asked, resolve=True) if asked else {})}
    trained = OmegaConf.to_container(cfg.diffusion, resolve=True)
    diffusion = instantiate(cfg.diffusion)
    # what check_guidance reads of the model to be trained: its conditioning
    node = cfg.get("conditioning")
    conditioning = Trained(
        None, None, {"conditioning": OmegaConf.to_container(node) if node else {}}
    )
    dim = math.prod(instantiate(cfg.data).data_shape)  # the examples' (their splits not loaded)
    configs = {}
    for name, keys in variants.items():
        key_prefix = f"eval.variants.{name}." if name else "eval."
        evaluation = OmegaConf.masked_copy(cfg.eval, eval_keys)  # a new node per variant
        OmegaConf.set_struct(evaluation, True)  # an unknown key is an error
        apply_variant(evaluation, dict(keys or {}), key_prefix)
        with open_dict(evaluation):
            evaluation.paths = cfg.paths  # the classifier cache under paths.data_dir
            evaluation.ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
            evaluation.logger = None  # the run's own loggers get the numbers
        try:
            check_same_parameterisation(
                trained, evaluation.diffusion.variance, evaluation.diffusion.prediction
            )
        except ValueError as error:  # its message starts with the key
            raise ValueError(f"{key_prefix}diffusion.{error}") from error
        try:
            check_split(evaluation.split)
            check_sampling(diffusion, 1, evaluation.batch_size, sampler_of(evaluation))
            check_likelihood_keys(evaluation, dim)
            every_class = "all" if conditioning.num_classes is not None else None  # as ddpm-eval
            check_guidance(conditioning, every_class, evaluation.guidance_scale)
        except ValueError as error:  # its message starts with the key
            raise ValueError(f"{key_prefix}{error}") from error
        configs[name] = evaluation
    return configs


def evaluate_after_fit(
    evaluations: dict[str, DictConfig], run: Run, output_dir: Path
) -> dict[str, float]:
    """ddpm-eval on the run's last.ckpt (into <run>/eval/, and <run>/eval/<name>/ for each
    variant), its headline numbers as `test/...` (`test/<name>/...`) sent to the run's loggers
    at the last step."""
    headline: dict[str, float] = {}
    likelihoods: dict[str, dict] = {}  # a variant that changes only the sampler reuses them
    for name, evaluation in evaluations.items():
        if not Path(evaluation.ckpt_path).is_file():
            raise ValueError(
                f"eval_after_fit=true needs {evaluation.ckpt_path}, which this run did not "
                "write: keep callbacks.checkpoint (save_last) on."
            )
        found = evaluate(evaluation, output_dir / "eval" / name, likelihoods)
        headline.update(headline_metrics(found, f"test/{name}/" if name else "test/"))
    for logger in run.trainer.loggers:
        logger.log_metrics(headline, step=run.trainer.global_step)
        logger.save()
    return headline


def _training_seconds(trainer: pl.Trainer, fallback: float) -> float:
    """Training time from the `timer` callback (Lightning's Timer keeps it in checkpoints, so it
    adds up over resumes), else `fallback`."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            return callback.time_elapsed("train")
    return fallback


def train(cfg: DictConfig) -> dict[str, float]:
    """Build and fit; return the final callback metrics (e.g. `val/loss`) as floats. Each run
    ends by writing results.json in its folder (what a sweep's results table reads)."""
    output_dir = Path(cfg.paths.output_dir)
    with user_errors():  # configuration errors end here, in one sentence, before training
        resolve_conditioning(cfg)
        record = finished_before(cfg)
        if record is not None:
            log.info(f"{output_dir} holds a finished run of this config: not trained again")
            return record["metrics"]
        evaluation = eval_config(cfg)
        run = build(cfg)
    started = time.perf_counter()
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
        seconds = _training_seconds(run.trainer, time.perf_counter() - started)
        metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
        if evaluation is not None:
            with user_errors():
                metrics.update(evaluate_after_fit(evaluation, run, output_dir))
    except NonFiniteLossError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_wandb(run.trainer.loggers)
    if run.trainer.is_global_zero:
        write_run_results(
            output_dir,
            {
                "config_digest": config_digest(OmegaConf.to_container(cfg, resolve=True)),
                "step": run.trainer.global_step,
                "wall_seconds": round(seconds, 1),
                "metrics": metrics,
            },
        )
    log.info("final metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    log.info(f"outputs (checkpoints, samples, logs) in {output_dir}")
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
    if not _in_multirun():
        return False
    return not HydraConfig.get().sweeper.get("_target_", "").endswith("BasicSweeper")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the final `optimized_metric` (what a sweeper optimises)."""
    quiet_known_noise()
    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    main()
