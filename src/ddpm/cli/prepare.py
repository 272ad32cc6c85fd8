"""`ddpm-prepare source=<image folder or data set> out=<folder or s3://...>`: write a data set as
litdata chunks for `data=streaming` (`ddpm.data.streaming`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ddpm.cli.common import quiet_known_noise, user_errors
from ddpm.config import CONFIG_PATH
from ddpm.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    TensorDataModule,
)
from ddpm.data.streaming import is_remote, prepare

log = logging.getLogger(__name__)
NAMED = {
    "digits": DigitsDataModule,
    "mnist": MNISTDataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "cifar10": CIFAR10DataModule,
}


def source_data(cfg: DictConfig) -> TensorDataModule:
    """The data module `source` names: an image folder, or one of `NAMED`."""
    source = str(cfg.source)
    if source in NAMED:
        cls = NAMED[source]
        if cls is DigitsDataModule:
            return DigitsDataModule(split_seed=cfg.split_seed, **_shape(cfg, 8, 1))
        size = cls.shape[1]
        return cls(
            root=cfg.root, val_size=cfg.val_size, split_seed=cfg.split_seed,
            **_shape(cfg, size, cls.shape[0]),
        )  # fmt: skip
    if not Path(source).is_dir():
        raise ValueError(
            f"source={source!r} is neither a folder of images nor one of the data sets "
            f"{', '.join(NAMED)}."
        )
    folder = ImageFolderDataModule(
        root=source, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed, **_shape(cfg, 32, 3),
    )  # fmt: skip
    folder.root_key = "source"
    return folder


def _shape(cfg: DictConfig, size: int, channels: int) -> dict[str, Any]:
    return {
        "image_size": size if cfg.image_size is None else cfg.image_size,
        "channels": channels if cfg.channels is None else cfg.channels,
    }


def prepare_data(cfg: DictConfig) -> dict[str, Any]:
    """Check everything, then write the chunks and ddpm.json (last: a set without it is not
    one, so an interrupted run is refused by data=streaming and can be rerun)."""
    with user_errors():
        out = str(cfg.out)
        if not is_remote(out) and Path(out).exists() and any(Path(out).iterdir()):
            raise ValueError(
                f"out={out} is not empty: choose a new folder (nothing is overwritten)."
            )
        data = source_data(cfg)
        data.check()
        workers = cfg.num_workers if cfg.num_workers is not None else os.cpu_count() or 1
        metadata = prepare(data, out, workers, cfg.chunk_bytes, source=str(cfg.source))
    counts = ", ".join(f"{n} {name}" for name, n in metadata["examples"].items())
    log.info(
        f"{cfg.source}: {counts} images of {metadata['channels']}x{metadata['image_size']}x"
        f"{metadata['image_size']} written to {out}; train with `python train.py data=streaming "
        f"data.input_dir={out}`"
    )
    return metadata


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    quiet_known_noise()
    prepare_data(cfg)
