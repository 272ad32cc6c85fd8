"""Read a checkpoint written by train.py and rebuild its objects through the `_target_` nodes of
the config stored in it (with the user's overrides applied), for sampling and evaluation."""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ddpm.backbones import compile_backbone, set_channels_last, set_matmul_precision
from ddpm.checks import check_choice
from ddpm.conditioning import conditioning_of
from ddpm.diffusion import LEARNED_VARIANCES, VARIANCES, GaussianDiffusion

ORACLE_TARGET = "ddpm.truth.Oracle"


@dataclass
class Trained:
    """A trained network with its diffusion and the config it was trained with."""

    backbone: nn.Module
    diffusion: GaussianDiffusion
    run_config: dict[str, Any]

    @property
    def num_classes(self) -> int | None:
        """The classes of a conditional model (`conditioning=class`), else None."""
        return conditioning_of(self.run_config)[0]

    @property
    def drop_prob(self) -> float:
        """The share of null labels it was trained with (> 0: it has an unconditional model)."""
        return conditioning_of(self.run_config)[1]

    @functools.cached_property
    def datamodule(self) -> Any:
        """The run's data module (its splits are rebuilt from the config, with the same seeds)."""
        return instantiate(self.run_config["data"])

    def clip_denoised(self, asked: bool | None = None) -> bool:
        """Whether to clamp the predicted x_0 to [-1, 1]: `asked`, or (None) as trained."""
        if asked is None:
            return bool(self.run_config["model"].get("clip_denoised", True))
        if not isinstance(asked, bool):
            raise ValueError(
                f"clip_denoised={asked!r} is invalid: allowed are true, false or null (as trained)."
            )
        return asked


def read_checkpoint(ckpt_path: object) -> dict[str, Any]:
    """torch.load a ddpm checkpoint (weights only: no code runs) or raise one clear ValueError."""
    if ckpt_path in (None, "", "???"):
        raise ValueError(
            "ckpt_path is required: pass ckpt_path=<a .ckpt file written by train.py>."
        )
    path = Path(str(ckpt_path))
    if path.is_dir():
        raise ValueError(
            f"ckpt_path={path} is a folder; pass a checkpoint file, e.g. "
            f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}."
        )
    if not path.is_file():
        raise ValueError(f"ckpt_path={path} does not exist: pass the path of a .ckpt file.")
    try:
        # mmap: the tensors are read only when used, so checking a large file costs little
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, foreign or hostile files all end here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"ckpt_path={path} is not a readable checkpoint ({reason}).") from None
    config = (
        checkpoint.get("hyper_parameters", {}).get("run_config")
        if isinstance(checkpoint, dict)
        else None
    )
    if not isinstance(config, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={path} holds no ddpm run (no hyper_parameters.run_config and state_dict): "
            "pass a checkpoint written by train.py."
        )
    return checkpoint


# What fine-tuning (train.py init_from=) may change: how the network is trained, not what it is.
FINE_TUNING_MAY_CHANGE = (
    "backbone.dropout", "diffusion.loss", "diffusion.vlb_weight", "diffusion.weighting",
    "diffusion.min_snr_gamma",
)  # fmt: skip


def check_same_model(
    run_config: dict[str, Any],
    checkpoint: dict[str, Any],
    path: object,
    doing: str = "resuming",
    key: str = "ckpt_path",
    may_change: tuple[str, ...] = (),
) -> None:
    """Refuse to resume (or, with `doing`, fine-tune) when the diffusion (schedule, T,
    parameterisation) or the backbone differ from the checkpoint's, naming the first key that
    differs (besides `may_change`) and both values."""
    trained = checkpoint["hyper_parameters"]["run_config"]
    check_same_conditioning(run_config, trained, path, doing, key)
    for group in ("diffusion", "backbone"):
        ours, theirs = _leaves(run_config[group], group), _leaves(trained[group], group)
        # a key that a checkpoint from an earlier version lacks had its parameter's default
        defaults = _defaults(trained[group].get("_target_"), group)
        for name in sorted(set(ours) | set(theirs)):
            if name in may_change:
                continue
            if name not in theirs and defaults.get(name, ...) in (ours.get(name), None):
                continue  # as the parameter's default (None: derived from other keys)
            ours_value = ours.get(name, defaults.get(name))
            theirs_value = theirs.get(name, defaults.get(name))
            if ours_value != theirs_value:
                raise ValueError(
                    f"{name}={ours_value!r} differs from {theirs_value!r} in "
                    f"{key}={path}: {doing} needs the same schedule, T, parameterisation "
                    "and backbone."
                )


def conditioning_name(config: dict[str, Any] | None) -> str:
    """A config's `conditioning` (none for configs from before it existed)."""
    return ((config or {}).get("conditioning") or {}).get("name", "none")


def check_same_conditioning(
    asked: dict[str, Any] | None,
    trained: dict[str, Any],
    path: object,
    doing: str,
    key: str = "ckpt_path",
) -> None:
    """Refuse a `conditioning` other than the checkpoint's (none when `asked` has none), and
    another number of classes, naming both."""
    if not (asked or {}).get("conditioning"):
        return
    ours, theirs = conditioning_name(asked), conditioning_name(trained)
    if ours != theirs:
        # ddpm-sample and ddpm-eval take the checkpoint's when none is given; train.py its own
        fix = "drop conditioning=" if doing.startswith("sampling") else f"set conditioning={theirs}"
        raise ValueError(
            f"conditioning={ours} differs from the checkpoint's conditioning={theirs} in "
            f"{key}={path}: {doing} needs the conditioning it was trained with; {fix} "
            f"(allowed: {theirs})."
        )
    if ours == "none":
        return
    classes = (asked["conditioning"].get("num_classes"), trained["conditioning"].get("num_classes"))
    if classes[0] is not None and classes[0] != classes[1]:
        raise ValueError(
            f"conditioning.num_classes={classes[0]} differs from the checkpoint's "
            f"{classes[1]} in {key}={path}: {doing} needs the classes it was trained with."
        )


def _defaults(target: str | None, prefix: str) -> dict[str, Any]:
    """{'prefix.param': default} of the keyword parameters of a `_target_` (None: none known)."""
    import inspect

    from hydra.utils import get_object

    if not target:
        return {}
    parameters = inspect.signature(get_object(target)).parameters.values()
    return {f"{prefix}.{p.name}": p.default for p in parameters if p.default is not p.empty}


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    """{'a.b.c': value} for the leaves of nested dicts."""
    if not isinstance(node, dict):
        return {prefix: node}
    leaves: dict[str, Any] = {}
    for key, value in node.items():
        leaves.update(_leaves(value, f"{prefix}.{key}"))
    return leaves


def load_trained_for(cfg: Any) -> Trained:
    """`load_trained` with the keys that sample.yaml, eval.yaml and truth.yaml share (the
    `schedule`, `variance` and `prediction` groups, `timesteps`), the backbone compiled as
    `compile` asks and `matmul_precision` set. `backbone=oracle` puts the Bayes-optimal network
    in the trained one's place (with no ckpt_path: on the chain and `data` of the config)."""
    set_matmul_precision(cfg.get("matmul_precision"))
    schedule = cfg.get("schedule")
    schedule = OmegaConf.to_container(schedule, resolve=True) if schedule else None
    backbone = cfg.get("backbone")
    backbone = OmegaConf.to_container(backbone, resolve=True) if backbone else None
    data = cfg.get("data")
    conditioning = cfg.get("conditioning")
    conditioning = OmegaConf.to_container(conditioning, resolve=True) if conditioning else None
    if cfg.ckpt_path in (None, "") and is_oracle(backbone):
        trained = oracle_without_checkpoint(
            OmegaConf.to_container(data, resolve=True) if data else None,
            backbone,
            schedule,
            cfg.timesteps,
            cfg.diffusion.variance,
            cfg.diffusion.get("prediction"),
            conditioning,
        )
    else:
        if data:
            raise ValueError(
                "data= is not used with a checkpoint: its data are the ones it was trained on; "
                "drop data= (it names the data of backbone=oracle without ckpt_path)."
            )
        trained = load_trained(
            cfg.ckpt_path,
            cfg.use_ema,
            cfg.diffusion.variance,
            schedule,
            cfg.timesteps,
            cfg.allow_schedule_change,
            cfg.diffusion.get("prediction"),
            backbone,
            conditioning,
        )
    set_channels_last(trained.backbone, cfg.get("channels_last", False))
    compile_backbone(trained.backbone, cfg.get("compile"))
    return trained


def is_oracle(backbone: dict[str, Any] | None) -> bool:
    """Whether a backbone node is `backbone=oracle` (ddpm.truth.Oracle)."""
    return bool(backbone) and backbone.get("_target_") == ORACLE_TARGET


def oracle_trained(config: dict[str, Any], diffusion: GaussianDiffusion) -> Trained:
    """The oracle network of the `backbone=oracle` node in `config`, for its `data` and the
    (trained) chain `diffusion`."""
    from ddpm.truth import Oracle, distribution_of

    datamodule = instantiate(config["data"])
    which = config["backbone"].get("distribution", "data")
    num_classes, _ = conditioning_of(config)
    distribution = distribution_of(datamodule, which, "backbone.distribution")
    oracle = Oracle(distribution, diffusion, num_classes)
    trained = Trained(oracle, diffusion, config)
    trained.__dict__["datamodule"] = datamodule  # the cached property, built once
    return trained


def oracle_without_checkpoint(
    data: dict[str, Any] | None,
    backbone: dict[str, Any],
    schedule: dict[str, Any] | None,
    timesteps: int | None,
    variance: str | None,
    prediction: str | None,
    conditioning: dict[str, Any] | None = None,
) -> Trained:
    """The oracle on a chain of the config's own (schedule linear, T = 1000, variance beta and
    prediction eps unless given) for the config's `data`; with `conditioning=class` the
    conditional one (the data's classes)."""
    if not data:
        raise ValueError(
            "backbone=oracle without ckpt_path needs the data it is the oracle of: pass "
            "data=gmm (or another data config, e.g. data=toy2d data.name=8gaussians)."
        )
    schedule = dict(schedule or {"_target_": "ddpm.schedules.make_beta_schedule", "name": "linear"})
    schedule["timesteps"] = timesteps or schedule.get("timesteps") or 1000
    variance, prediction = variance or "beta", prediction or "eps"
    diffusion_node = {
        "_target_": "ddpm.diffusion.GaussianDiffusion",
        "betas": schedule,
        "variance": variance,
        "prediction": prediction,
        "loss": "hybrid" if variance in LEARNED_VARIANCES else "simple",
    }
    config = {"data": data, "diffusion": diffusion_node, "backbone": backbone, "model": {}}
    if conditioning and conditioning.get("name") == "class":
        conditioning = {**conditioning, "num_classes": instantiate(data).condition_on_labels()}
        config["conditioning"] = conditioning
    trained = oracle_trained(config, instantiate(diffusion_node))
    # clamp the predicted x_0 to [-1, 1] for images (quantised data), not for points
    config["model"]["clip_denoised"] = trained.datamodule.num_levels is not None
    return trained


def pick_device(name: str) -> str:
    """`auto` is this process's GPU when one is visible (cuda:LOCAL_RANK under torchrun), else
    cpu."""
    if name == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return name


def _schedule_key(key: str) -> str:
    """How a user names a key of the schedule node: `schedule`, `timesteps`, `schedule.<param>`."""
    return {"name": "schedule", "timesteps": "timesteps"}.get(key, f"schedule.{key}")


def asked_schedule(
    trained: dict[str, Any],
    schedule: str | dict[str, Any] | None = None,
    timesteps: int | None = None,
    allow_schedule_change: bool = False,
) -> dict[str, Any]:
    """The schedule node to build a chain with: the trained one (`diffusion.betas` of the stored
    config), or the user's `schedule` node (or name) with `timesteps`; T is the trained one
    unless given. Any difference from the trained node is refused, naming the key, unless
    `allow_schedule_change`."""
    if schedule is None:
        asked = dict(trained)
    elif isinstance(schedule, str):
        asked = {"_target_": trained["_target_"], "name": schedule}
    else:
        asked = dict(schedule)
    if timesteps is not None:
        asked["timesteps"] = timesteps
    if asked.get("timesteps") is None:
        asked["timesteps"] = trained["timesteps"]
    if not allow_schedule_change:
        rest = sorted((set(asked) | set(trained)) - {"name", "timesteps"})
        for key in ("name", "timesteps", *rest):
            if asked.get(key) != trained.get(key):
                name = _schedule_key(key)
                raise ValueError(
                    f"{name}={asked.get(key)!r} differs from the checkpoint's "
                    f"{name}={trained.get(key)!r}: the network was trained on that chain; drop "
                    f"{name}, or set allow_schedule_change=true to use it."
                )
    return asked


def check_same_parameterisation(
    trained: dict[str, Any], variance: str | None, prediction: str | None
) -> None:
    """Refuse a `prediction` other than the trained one, and a `variance` change unless both are
    fixed (beta <-> tilde_beta), naming the key and both values."""
    if variance is not None:
        check_choice("variance", variance, VARIANCES)
    trained_prediction = trained.get("prediction", "eps")
    if prediction is not None and prediction != trained_prediction:
        raise ValueError(
            f"prediction={prediction} differs from the checkpoint's prediction="
            f"{trained_prediction}: the network was trained to predict that; drop prediction= "
            f"(allowed: {trained_prediction})."
        )
    trained_variance = trained.get("variance", "beta")
    learned = {v in LEARNED_VARIANCES for v in (variance, trained_variance)}
    if variance is not None and variance != trained_variance and True in learned:
        allowed = trained_variance if trained_variance in LEARNED_VARIANCES else "beta, tilde_beta"
        raise ValueError(
            f"variance={variance} differs from the checkpoint's variance={trained_variance}: "
            "only a fixed variance can be swapped for the other, since a learned one is the "
            f"network's own output (allowed: {allowed})."
        )


def load_trained(
    ckpt_path: object,
    use_ema: bool = True,
    variance: str | None = None,
    schedule: str | dict[str, Any] | None = None,
    timesteps: int | None = None,
    allow_schedule_change: bool = False,
    prediction: str | None = None,
    backbone: dict[str, Any] | None = None,
    conditioning: dict[str, Any] | None = None,
) -> Trained:
    """Rebuild the backbone and diffusion of a checkpoint through the `_target_` nodes of its
    stored config and load its weights.

    `use_ema` picks the EMA weights (the checkpoint's `state_dict`) or the raw ones. A fixed
    `variance` may be swapped for the other (the same network serves both sigma_t^2); a learned
    one, or a `prediction` other than the trained one, is refused (`check_same_parameterisation`).
    A `schedule` (a node of the schedule group, or a name) or `timesteps` other than the trained
    ones is refused unless `allow_schedule_change` is true. A `backbone` node of
    `backbone=oracle` replaces the trained network by the Bayes-optimal one for its data. A
    `conditioning` node other than the checkpoint's is refused.
    """
    checkpoint = read_checkpoint(ckpt_path)
    config = copy.deepcopy(checkpoint["hyper_parameters"]["run_config"])
    check_same_conditioning({"conditioning": conditioning}, config, ckpt_path, "sampling it")
    diffusion_node = config["diffusion"]
    diffusion_node["betas"] = asked_schedule(
        diffusion_node["betas"], schedule, timesteps, allow_schedule_change
    )
    check_same_parameterisation(diffusion_node, variance, prediction)
    if variance is not None:
        diffusion_node["variance"] = variance
    diffusion: GaussianDiffusion = instantiate(diffusion_node)
    if is_oracle(backbone):
        return oracle_trained({**config, "backbone": backbone}, diffusion)
    if backbone:
        raise ValueError(
            f"backbone={backbone.get('_target_')} cannot replace a checkpoint's network: "
            "allowed is backbone=oracle (the Bayes-optimal network), or no backbone=."
        )
    backbone = instantiate(config["backbone"])
    state = checkpoint["state_dict"] if use_ema else checkpoint.get("current_model_state")
    if state is None:
        raise ValueError(f"use_ema=false, but ckpt_path={ckpt_path} holds only the EMA weights.")
    prefix = "backbone."
    backbone.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    backbone.eval()
    return Trained(backbone, diffusion, config)
