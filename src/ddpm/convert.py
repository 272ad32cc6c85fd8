"""diffusers' format <-> ours: a `UNet2DModel` of the DDPM layout (the paper's released models,
`google/ddpm-*`) as our `UNet`, and a `DDPMScheduler` config as our chain, both ways.

The two networks are the same computation (the original DDPM code's): per level residual blocks
with the step embedding, single-head attention at the listed resolutions, stride-2 convs down and
nearest-neighbour upsampling with a conv. So importing is building our U-Net from the config and
renaming its weights; the one difference in the tensors is attention, whose q, k and v are three
linear layers there and one 1x1 conv here (`qkv`). A config outside that layout (another block
type, multi-head attention, another time embedding, ...) is refused in one sentence naming the key.
No library converts between the two, so the mapping is written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

UNET_TARGET = "ddpm.backbones.UNet"
# The DDPM layout's fixed parts: diffusers' UNet2DModel config keys and the values ours computes.
FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "time_embedding_dim": None,
    "attn_norm_num_groups": None,
}
# variance_type of diffusers' DDPMScheduler -> ours
VARIANCES = {
    "fixed_small": "tilde_beta",
    "fixed_small_log": "tilde_beta",
    "fixed_large": "beta",
    "fixed_large_log": "beta",
    "learned": "learned",
    "learned_range": "learned_range",
}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


def _refuse(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(
        f"{key}={value!r} is not the DDPM layout this converts: allowed is {allowed}."
    )


def backbone_node(config: dict[str, Any]) -> dict[str, Any]:
    """Our backbone node (`_target_` ddpm.backbones.UNet) for a UNet2DModel config."""
    for key, value in FIXED.items():
        if config.get(key, value) != value:
            raise _refuse(key, config[key], repr(value))
    widths = list(config["block_out_channels"])
    base, levels = widths[0], len(widths)
    if any(w % base for w in widths):
        raise _refuse("block_out_channels", widths, "multiples of the first width")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    size = int(config["sample_size"])
    attention = []
    for level, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise _refuse("down_block_types", kind, "DownBlock2D or AttnDownBlock2D")
        mirror = up[levels - 1 - level]
        wanted = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
        if mirror != wanted:
            raise _refuse("up_block_types", mirror, f"{wanted} (mirroring {kind})")
        if kind == "AttnDownBlock2D":
            attention.append(size // 2**level)
    heads = config.get("attention_head_dim")
    if heads is not None and any(heads != widths[i] for i in range(levels)):
        raise _refuse("attention_head_dim", heads, "null (single-head attention)")
    return {
        "_target_": UNET_TARGET,
        "in_channels": int(config["in_channels"]),
        "image_size": size,
        "base_channels": base,
        "channel_mult": [w // base for w in widths],
        "num_res_blocks": int(config["layers_per_block"]),
        "attn_resolutions": attention,
        "dropout": float(config.get("dropout", 0.0)),
        "num_groups": int(config["norm_num_groups"]),
        "out_channels": int(config["out_channels"]),
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "downsample_padding": int(config.get("downsample_padding", 1)),
    }


def unet_config(node: dict[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config of our backbone node (the inverse of `backbone_node`)."""
    if node.get("_target_") != UNET_TARGET:
        raise ValueError(f"backbone={node.get('_target_')} cannot be exported: only the UNet can.")
    if node.get("num_classes") is not None:
        raise ValueError("a class-conditional UNet (conditioning=class) cannot be exported yet.")
    size, mult = node["image_size"], list(node["channel_mult"])
    attention = [size // 2**level in node["attn_resolutions"] for level in range(len(mult))]
    return {
        **{k: v for k, v in FIXED.items() if v is not None},
        "sample_size": size,
        "in_channels": node["in_channels"],
        "out_channels": node.get("out_channels") or node["in_channels"],
        "block_out_channels": [node["base_channels"] * m for m in mult],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": node["num_res_blocks"],
        "norm_num_groups": node["num_groups"],
        "norm_eps": node.get("norm_eps", 1e-5),
        "downsample_padding": node.get("downsample_padding", 1),
        "dropout": node.get("dropout", 0.0),
        "attention_head_dim": None,
    }


def module_pairs(node: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights, kind `res` (a
    residual block), `attn` or `plain` (the same parameter names)."""
    size, levels, blocks = node["image_size"], len(node["channel_mult"]), node["num_res_blocks"]
    attention = {level for level in range(levels) if size // 2**level in node["attn_resolutions"]}
    pairs = [
        ("temb.0", "time_embedding.linear_1", "plain"),
        ("temb.2", "time_embedding.linear_2", "plain"),
        ("conv_in", "conv_in", "plain"),
    ]
    i = 0
    for level in range(levels):
        for j in range(blocks):
            pairs.append((f"down.{i}", f"down_blocks.{level}.resnets.{j}", "res"))
            i += 1
            if level in attention:
                pairs.append((f"down.{i}", f"down_blocks.{level}.attentions.{j}", "attn"))
                i += 1
        if level != levels - 1:
            pairs.append((f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            i += 1
    pairs += [
        ("mid.0", "mid_block.resnets.0", "res"),
        ("mid.1", "mid_block.attentions.0", "attn"),
        ("mid.2", "mid_block.resnets.1", "res"),
    ]
    i = 0
    for k, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            pairs.append((f"up.{i}", f"up_blocks.{k}.resnets.{j}", "res"))
            i += 1
            if level in attention:
                pairs.append((f"up.{i}", f"up_blocks.{k}.attentions.{j}", "attn"))
                i += 1
        if level != 0:
            pairs.append((f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
            i += 1
    return pairs + [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]


RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
             "conv2": "conv2", "skip": "conv_shortcut"}  # fmt: skip


def parameter_pairs(
    node: dict[str, Any], has: Callable[[str, str], bool]
) -> list[tuple[str, list[str], str]]:
    """(our parameter, diffusers' parameters, how they relate) for every parameter: `same`, or
    for attention `qkv` (our one 1x1 conv is their q, k and v linear layers stacked) and `proj`
    (a 1x1 conv and a linear layer). `has(ours, theirs)` says whether a residual block has its
    optional 1x1 skip conv (present when its input and output widths differ)."""
    pairs = []
    for ours, theirs, kind in module_pairs(node):
        for p in ("weight", "bias"):
            if kind == "plain":
                pairs.append((f"{ours}.{p}", [f"{theirs}.{p}"], "same"))
            elif kind == "res":
                for mine, their in RES_NAMES.items():
                    if mine != "skip" or has(f"{ours}.skip.{p}", f"{theirs}.conv_shortcut.{p}"):
                        pairs.append((f"{ours}.{mine}.{p}", [f"{theirs}.{their}.{p}"], "same"))
            else:
                pairs.append((f"{ours}.norm.{p}", [f"{theirs}.group_norm.{p}"], "same"))
                qkv = [f"{theirs}.to_{n}.{p}" for n in "qkv"]
                pairs.append((f"{ours}.qkv.{p}", qkv, "qkv" if p == "weight" else "stack"))
                proj = "proj" if p == "weight" else "same"
                pairs.append((f"{ours}.proj.{p}", [f"{theirs}.to_out.0.{p}"], proj))
    return pairs


def from_diffusers(state: dict[str, torch.Tensor], node: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict as our UNet's (`node`, from `backbone_node`)."""
    out = {}
    for ours, theirs, how in parameter_pairs(node, lambda _, their: their in state):
        parts = [state[name] for name in theirs]
        joined = torch.cat(parts) if how in ("qkv", "stack") else parts[0]
        out[ours] = joined[:, :, None, None] if how in ("qkv", "proj") else joined
    return out


def to_diffusers(state: dict[str, torch.Tensor], node: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our UNet's state dict as a UNet2DModel's (the inverse of `from_diffusers`)."""
    out = {}
    for ours, theirs, how in parameter_pairs(node, lambda mine, _: mine in state):
        value = state[ours].flatten(1) if how in ("qkv", "proj") else state[ours]
        for name, part in zip(theirs, value.chunk(len(theirs)), strict=True):
            out[name] = part
    return out


def diffusion_node(scheduler: dict[str, Any], learned: bool) -> dict[str, Any]:
    """Our diffusion node (schedule, T, variance, prediction) for a DDPMScheduler config.
    Our linear and quadratic ends are given at T = 1000 and scale by 1000 / T, diffusers' are
    the ends themselves: they are converted."""
    if scheduler.get("trained_betas") is not None:
        raise _refuse("trained_betas", "(a list)", "null")
    name = scheduler.get("beta_schedule", "linear")
    if name not in SCHEDULES:
        raise _refuse("beta_schedule", name, ", ".join(SCHEDULES))
    T = int(scheduler.get("num_train_timesteps", 1000))
    schedule: dict[str, Any] = {"_target_": "ddpm.schedules.make_beta_schedule",
                                "name": SCHEDULES[name], "timesteps": T}  # fmt: skip
    if name != "squaredcos_cap_v2":
        schedule["beta_start"] = float(scheduler.get("beta_start", 1e-4)) * (T / 1000)
        schedule["beta_end"] = float(scheduler.get("beta_end", 0.02)) * (T / 1000)
    variance = scheduler.get("variance_type", "fixed_small")
    if variance not in VARIANCES:
        raise _refuse("variance_type", variance, ", ".join(VARIANCES))
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise _refuse("prediction_type", prediction, ", ".join(PREDICTIONS))
    ours = VARIANCES[variance]
    if (ours in ("learned", "learned_range")) != learned:
        raise ValueError(
            f"variance_type={variance!r} does not fit the network's output channels (a learned "
            "variance needs twice the input channels, a fixed one as many)."
        )
    return {
        "_target_": "ddpm.diffusion.GaussianDiffusion",
        "betas": schedule,
        "variance": ours,
        "prediction": PREDICTIONS[prediction],
        "loss": "hybrid" if learned else "simple",
    }


def scheduler_config(node: dict[str, Any], clip_sample: bool) -> dict[str, Any]:
    """The DDPMScheduler config of our diffusion node (the inverse of `diffusion_node`)."""
    schedule = node["betas"]
    names = {v: k for k, v in SCHEDULES.items()}
    if schedule["name"] not in names:
        raise ValueError(
            f"schedule={schedule['name']} has no DDPMScheduler counterpart: allowed are "
            f"{', '.join(names)}."
        )
    T = int(schedule["timesteps"])
    config: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": T,
        "beta_schedule": names[schedule["name"]],
        "variance_type": {v: k for k, v in VARIANCES.items() if not k.endswith("_log")}[
            node.get("variance", "beta")
        ],
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[node.get("prediction", "eps")],
        "clip_sample": clip_sample,
        "clip_sample_range": 1.0,
    }
    if schedule["name"] != "cosine":
        config["beta_start"] = schedule.get("beta_start", 1e-4) * (1000 / T)
        config["beta_end"] = schedule.get("beta_end", 0.02) * (1000 / T)
    return config


def is_learned(node: dict[str, Any]) -> bool:
    """Whether a backbone node outputs twice its input channels (a learned variance)."""
    return node["out_channels"] == 2 * node["in_channels"]


# Files of diffusers' format: a pipeline folder has unet/ and scheduler/; a model folder has the
# network's config.json and weights, with the scheduler's config beside them.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def find_diffusers_files(source: str | Path) -> tuple[Path, Path, Path]:
    """(the UNet's config.json, its weights, the scheduler's config) in a downloaded folder, or
    a one-sentence ValueError naming what is missing."""
    root = Path(source)
    if not root.is_dir():
        raise ValueError(
            f"source={str(root)!r} is not a folder: pass a downloaded diffusers folder."
        )
    for unet, scheduler in ((root / "unet", root / "scheduler"), (root, root)):
        config = unet / "config.json"
        weights = next((unet / w for w in WEIGHT_FILES if (unet / w).is_file()), None)
        schedule = scheduler / "scheduler_config.json"
        if config.is_file() and weights is not None and schedule.is_file():
            return config, weights, schedule
    raise ValueError(
        f"source={str(root)!r} holds no diffusers UNet2DModel with its scheduler: expected "
        "unet/config.json, unet/diffusion_pytorch_model.safetensors (or .bin) and "
        "scheduler/scheduler_config.json (a pipeline folder), or the same three files in the "
        "folder itself."
    )


def read_diffusers(source: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(the UNet2DModel config, its state dict, the DDPMScheduler config) of a folder."""
    config_file, weights_file, scheduler_file = find_diffusers_files(source)
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _refuse("_class_name", config["_class_name"], "'UNet2DModel'")
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
    else:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    return config, state, json.loads(scheduler_file.read_text())


def write_diffusers(
    out: str | Path, config: dict, state: dict[str, torch.Tensor], scheduler: dict
) -> None:
    """A DDPMPipeline folder: model_index.json, unet/ (config.json and safetensors weights) and
    scheduler/scheduler_config.json, what diffusers' `from_pretrained` reads."""
    from safetensors.torch import save_file

    root = Path(out)
    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    unet = {"_class_name": "UNet2DModel", **config}
    (root / "unet" / "config.json").write_text(json.dumps(unet, indent=2) + "\n")
    weights = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(weights, str(root / "unet" / WEIGHT_FILES[0]))
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler, indent=2) + "\n"
    )
