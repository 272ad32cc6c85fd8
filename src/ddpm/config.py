"""Where the configs are and the resolvers they use, registered when `ddpm` is imported (so a
config composed with Hydra's compose API resolves too, not only inside the commands)."""

from __future__ import annotations

import hashlib
import re
from importlib.resources import files
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The shipped configs (the repository's conf/, installed as the package ddpm.conf).
CONFIG_MODULE = "ddpm.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def group_option(group: str, name: str, key: str) -> DictConfig:
    """The node of the shipped `conf/<group>/<name>.yaml` (a config group's option named in a
    plain value, e.g. an eval variant's `sampler: dpm_solver`); a one-sentence ValueError naming
    `key` and the options for a name that is not one."""
    folder = files(CONFIG_MODULE) / group
    options = sorted(  # the options that build something (not an old name kept to refuse it)
        p.name.removesuffix(".yaml")
        for p in folder.iterdir()
        if p.name.endswith(".yaml") and "_target_" in p.read_text()
    )
    if not (folder / f"{name}.yaml").is_file():
        raise ValueError(f"{key}={name!r} is unknown: allowed are {', '.join(options)}.")
    return OmegaConf.create((folder / f"{name}.yaml").read_text())


# What a folder name keeps: what Hydra's override grammar reads as a plain value and a shell
# passes unquoted, so that any path we write can be pasted into any command as it is.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+\-@%]")


def short_dirname(name: str, limit: int = 200) -> str:
    """A sweep job's folder name from its overrides (Hydra's override_dirname, written with `-`
    between key and value and `+` between overrides): every character that a command line would
    need quoted (`=`, `,`, `/`, brackets, spaces, ...) made `_`, and past `limit` characters cut and
    ended with a hash of the whole, since file systems refuse names over 255 bytes."""
    safe = _UNSAFE.sub("_", name)
    if len(safe) <= limit:
        return safe
    return f"{safe[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def launcher_setting(key: str, default: Any = None) -> Any:
    """`${launcher:KEY,DEFAULT}`: hydra.launcher.KEY when the run's launcher sets it (e.g. nodes
    and gpus_per_node under hydra/launcher=slurm), else DEFAULT."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return default
    value = HydraConfig.get().launcher.get(key)
    return default if value is None else value


def choice_or(choice: str | None, default: str) -> str:
    """`${choice_or:${hydra:runtime.choices.GROUP},DEFAULT}`: the group's option, or DEFAULT when
    the group is left null."""
    return default if choice in (None, "None", "null") else choice


def register_resolvers() -> None:
    """Register the resolvers the configs use (again is harmless): `${output_channels:C,VARIANCE}`
    is the backbone's output channels, 2C with a learned variance; `${prepared:DIR,KEY}` is KEY
    (image_size, channels) of the data set ddpm-prepare wrote to DIR."""
    from ddpm.data.streaming import prepared
    from ddpm.diffusion import output_channels

    for name, resolver in (
        ("short_dirname", short_dirname),
        ("launcher", launcher_setting),
        ("choice_or", choice_or),
        ("output_channels", output_channels),
        ("prepared", prepared),
    ):
        OmegaConf.register_new_resolver(name, resolver, replace=True)
