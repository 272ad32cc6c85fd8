"""Data sets larger than memory, through Lightning's streaming library, litdata: `ddpm-prepare`
writes each split's images once as litdata chunks (uint8, with labels where there are any), in
a local folder or an s3:// prefix, and `data=streaming` streams them back with litdata's
StreamingDataset / StreamingDataLoader, which shard by rank and keep their position in every
checkpoint. A prepared data set is a folder with one litdata folder per split (train/, val/,
test/) and `ddpm.json`, which says what the images are and is written last."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import litdata
import numpy as np
import torch
from litdata.utilities.env import _DistributedEnv

from ddpm.checks import check_int
from ddpm.data.base import SPLITS, ImageDataModule, TensorDataModule, to_model_range
from ddpm.distributed import batch_seed

METADATA = "ddpm.json"
FORMAT = "ddpm-prepared-images"


# data.max_cache_size as litdata reads it: bytes, or a number with one of its units
CACHE_SIZE = re.compile(r"\s*\d+(\.\d+)?\s*(tb|gb|mb|kb|t|g|m|k|b)?\s*", re.IGNORECASE)


def check_cache_size(value: Any) -> None:
    """`data.max_cache_size`: null, a size (100GB, 500MB, bytes) or a fraction of the free disk."""
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return
    if isinstance(value, float) and 0 < value <= 1:
        return
    if isinstance(value, str) and CACHE_SIZE.fullmatch(value):
        return
    raise ValueError(
        f"data.max_cache_size={value!r} is invalid: allowed are null (litdata's default), a size "
        "such as 100GB or 500MB (units tb, gb, mb, kb) and a fraction of the free disk in (0, 1]."
    )


def is_remote(path: str) -> bool:
    """An s3:// prefix (read through boto3 and litdata's cache)."""
    return str(path).startswith("s3://")


def local_folder(path: str) -> Path:
    """The folder of a local data set: `local:/path` (litdata reads it through its cache, as
    if it were remote: for a network file system) or a plain path."""
    return Path(str(path).removeprefix("local:"))


def join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


def _s3_client() -> Any:
    """A boto3 client that tries an unreachable endpoint once, for seconds: litdata's own client
    retries for minutes (measured: 258 s), so the metadata is read with this one first."""
    import boto3
    import botocore.config

    config = botocore.config.Config(
        connect_timeout=5, read_timeout=30, retries={"max_attempts": 1, "mode": "standard"}
    )
    return boto3.client("s3", config=config)


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def read_metadata(input_dir: str, key: str = "data.input_dir") -> dict[str, Any]:
    """The `ddpm.json` of a prepared data set; a one-sentence ValueError naming `key` when the
    folder is not one or an s3:// path cannot be read."""
    path = join(input_dir, METADATA)
    try:
        if is_remote(input_dir):
            bucket, name = _bucket_key(path)
            text = _s3_client().get_object(Bucket=bucket, Key=name)["Body"].read().decode()
        else:
            text = local_folder(path).read_text()
        metadata = json.loads(text)
    except FileNotFoundError:
        raise ValueError(
            f"{key}={input_dir!r} is not a prepared data set (no {METADATA}): write one with "
            f"ddpm-prepare source=<image folder or data set> out={input_dir}."
        ) from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{key}={input_dir!r}: {METADATA} is unreadable ({error}).") from None
    except Exception as error:  # botocore's: no credentials, no network, no such bucket or key
        raise ValueError(
            f"{key}={input_dir!r} cannot be read ({type(error).__name__}: {error}); check the "
            "path, the network and the AWS credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{key}={input_dir!r}: {METADATA} is not ddpm-prepare's (format {FORMAT!r}); "
            "prepare the data set again with ddpm-prepare."
        )
    return metadata


def write_metadata(out: str, metadata: dict[str, Any]) -> None:
    text = json.dumps(metadata, indent=2)
    if is_remote(out):
        bucket, name = _bucket_key(join(out, METADATA))
        _s3_client().put_object(Bucket=bucket, Key=name, Body=text.encode())
    else:
        local_folder(join(out, METADATA)).write_text(text)


@functools.cache
def _cached_metadata(input_dir: str) -> dict[str, Any]:
    return read_metadata(input_dir)


def prepared(input_dir: Any, key: str) -> Any:
    """`${prepared:${data.input_dir},KEY}`: KEY of the prepared data set's metadata (image_size,
    channels), or None when it cannot be read (the data module then says why, in one
    sentence)."""
    if input_dir in (None, "", "???"):
        return None
    try:
        return _cached_metadata(str(input_dir)).get(key)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Writing: ddpm-prepare


def _tensor_example(images: torch.Tensor, labels: torch.Tensor | None, i: int) -> dict:
    example = {"image": images[i].numpy()}
    return example if labels is None else {**example, "label": int(labels[i])}


def _file_example(
    load: Callable[[Path], torch.Tensor], shape: tuple, errors: str, item: tuple[Path, int | None]
) -> dict:
    """One image file's example. An unreadable file is noted in the folder `errors` and stands
    as a blank image, so that the writers finish (litdata can hang when a worker raises) and
    `prepare` refuses the set in one sentence."""
    path, label = item
    try:
        image = load(path).numpy()
    except ValueError as error:
        with (Path(errors) / f"{os.getpid()}.txt").open("a") as noted:
            noted.write(f"{error}\n")
        image = np.zeros(shape, np.uint8)
    return {"image": image} if label is None else {"image": image, "label": label}


def split_inputs(data: TensorDataModule, errors: str) -> dict[str, tuple[Callable, Sequence]]:
    """Per split, a function making one example and the inputs it is mapped over: file paths
    read in the workers for an image folder (its images never all in memory; unreadable ones
    noted in the folder `errors`), indices into the splits held in memory for the others."""
    from ddpm.data.image_folder import ImageFolderDataModule

    if isinstance(data, ImageFolderDataModule):
        files, labels = data.files(), data.file_labels()
        out = {}
        for name, indices in zip(SPLITS, data.split_indices(), strict=True):
            items = [(files[i], None if labels is None else labels[i]) for i in indices.tolist()]
            make = functools.partial(_file_example, data.load, data.data_shape, errors)
            out[name] = (make, items)
        return out
    return {
        name: (
            functools.partial(_tensor_example, data.splits[name], data.labels(name)),
            list(range(len(data.splits[name]))),
        )
        for name in SPLITS
    }


def prepare(
    data: TensorDataModule,
    out: str,
    num_workers: int,
    chunk_bytes: str | int = "64MB",
    source: str = "",
) -> dict[str, Any]:
    """Write `data`'s three splits as litdata chunks under `out` (in `num_workers` processes,
    with litdata's progress bar), then `ddpm.json`; the metadata."""
    check_int("num_workers", num_workers)
    counts = {}
    with tempfile.TemporaryDirectory() as errors:
        for name, (make_example, inputs) in split_inputs(data, errors).items():
            litdata.optimize(
                fn=make_example,
                inputs=inputs,
                output_dir=join(out, name),
                chunk_bytes=chunk_bytes,
                num_workers=min(num_workers, len(inputs)),
                keep_data_ordered=True,  # the split's order, so a prepared set is reproducible
                start_method="fork",
            )
            counts[name] = len(inputs)
            failed = [line for f in Path(errors).iterdir() for line in f.read_text().splitlines()]
            if failed:  # no ddpm.json: what was written is not taken for a data set
                raise ValueError(
                    f"{min(failed).rstrip('.')} ({len(failed)} unreadable image(s) in the {name} "
                    "split; remove or replace them and prepare again into a new folder)."
                )
    channels, image_size, _ = data.data_shape
    names = getattr(data, "class_names", lambda: None)()
    metadata = {
        "format": FORMAT,
        "image_size": image_size,
        "channels": channels,
        "num_levels": data.num_levels,
        "num_classes": data.num_classes,
        "class_names": names,
        "examples": counts,
        "source": source,
    }
    write_metadata(out, metadata)
    return metadata


# ---------------------------------------------------------------------------------------------
# Reading: data=streaming


class StreamingImages(litdata.StreamingDataset):
    """litdata's StreamingDataset of a prepared split of `size` examples, as model inputs: (x,)
    or, with `labels`, (x, y), x in [-1, 1]. With `hflip` the flips are drawn once per epoch,
    one per example, as `EpochSampler` draws them (from the seed and the epoch): a resumed run's
    are the uninterrupted run's."""

    def __init__(
        self, input_dir: str, size: int, num_levels: int, labels: bool, hflip: bool, **kwargs: Any
    ) -> None:
        super().__init__(input_dir, **kwargs)
        self.size, self.num_levels, self.with_labels, self.hflip = size, num_levels, labels, hflip
        self._flips: tuple[int, np.ndarray] | None = None  # (epoch, a flip per example)

    def flips(self) -> np.ndarray:
        """This epoch's flips, a bool per example of the split."""
        if self._flips is None or self._flips[0] != self.current_epoch:
            g = torch.Generator().manual_seed(batch_seed(self.seed, self.current_epoch))
            self._flips = (self.current_epoch, (torch.rand(self.size, generator=g) < 0.5).numpy())
        return self._flips[1]

    def __getitem__(self, index: Any) -> Any:
        example = super().__getitem__(index)
        x = to_model_range(torch.from_numpy(example["image"]), self.num_levels)
        if self.hflip and self.flips()[getattr(index, "index", index)]:
            x = x.flip(-1)
        return (x, torch.tensor(example["label"])) if self.with_labels else (x,)


class EpochStreamingLoader(litdata.StreamingDataLoader):
    """litdata's StreamingDataLoader, for a trainer that stops reading at the epoch's length.

    A loader restored from a checkpoint mid-epoch replays that epoch's order until its iterator
    runs out; Lightning, which knows the length, never exhausts it, so litdata would replay the
    restored epoch again instead of starting the next. A new pass that starts after a whole
    epoch was read is a new epoch (the uninterrupted run's)."""

    def __iter__(self) -> Any:
        if self.restore and self._num_samples_yielded_streaming >= len(self) * self.batch_size:
            self.restore = False
        return super().__iter__()


class StreamingDataModule(ImageDataModule):
    """Images prepared by `ddpm-prepare`, streamed from `input_dir` (a folder or s3://...):
    training and validation read a few chunks at a time (a remote or `local:` set through a
    local cache of at most `max_cache_size`, None: litdata's choice), so memory stays bounded
    whatever the data set's size. What needs a whole split at once (FID's reference, the
    classifier, ddpm-eval's bound) reads its first `max_in_memory` examples (the prepared order
    is already a seeded permutation)."""

    def __init__(
        self,
        input_dir: str,
        image_size: int | None = None,
        channels: int | None = None,
        num_levels: int | None = None,
        hflip: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        max_cache_size: str | None = None,
        cache_dir: str | None = None,
        max_in_memory: int = 10000,
    ) -> None:
        check_int("data.max_in_memory", max_in_memory)
        check_cache_size(max_cache_size)
        super().__init__(batch_size, num_workers, hflip)
        self.typed_input_dir = self.input_dir = str(input_dir)
        if not is_remote(self.input_dir):  # as litdata resolves it (a resume compares the two)
            absolute = str(local_folder(self.input_dir).absolute())
            prefix = "local:" if self.input_dir.startswith("local:") else ""
            self.input_dir = prefix + absolute
        if None in (image_size, channels, num_levels):  # the config could not read the set
            meta = self.metadata  # why, in one sentence
            image_size = meta["image_size"] if image_size is None else image_size
            channels = meta["channels"] if channels is None else channels
            num_levels = meta["num_levels"] if num_levels is None else num_levels
        # Shown and stored without the data (ddpm-sample on another machine): the set itself is
        # read, and these checked against it, when training or evaluation needs it (check()).
        self.image_size, self.channels, self.num_levels = image_size, channels, num_levels
        self.max_cache_size, self.cache_dir = max_cache_size, cache_dir
        self.max_in_memory = max_in_memory

    @functools.cached_property
    def metadata(self) -> dict[str, Any]:
        """The prepared set's ddpm.json (a one-sentence ValueError when it cannot be read)."""
        return read_metadata(self.typed_input_dir)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int | None:
        return self.metadata["num_classes"]

    def class_names(self) -> list[str] | None:
        return self.metadata.get("class_names")

    def check(self) -> None:
        meta, typed = self.metadata, self.typed_input_dir
        shape = (meta["channels"], meta["image_size"])
        if (self.channels, self.image_size) != shape:
            raise ValueError(
                f"data.image_size={self.image_size!r} and data.channels={self.channels!r} do not "
                f"fit the prepared data set data.input_dir={typed!r}: its images are "
                f"{shape[1]}x{shape[1]} with {shape[0]} channel(s); leave both to the config "
                "(read from the set), or prepare it again with ddpm-prepare image_size=... "
                "channels=...."
            )
        if self.num_levels != meta["num_levels"]:
            raise ValueError(
                f"data.num_levels={self.num_levels!r} differs from the {meta['num_levels']} "
                f"levels of the prepared data set data.input_dir={typed!r}: leave it to the "
                "config (read from the set)."
            )
        if is_remote(self.input_dir):
            return  # ddpm.json was read; litdata reads the rest
        for name in SPLITS:
            index = local_folder(self.input_dir) / name / "index.json"
            if not index.is_file():
                raise ValueError(
                    f"data.input_dir={self.input_dir!r} lacks its {name} split ({index} is "
                    "missing): prepare the data set again with ddpm-prepare."
                )

    def _read_split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first `max_in_memory` examples of a split as uint8 levels, and their labels."""
        dataset = litdata.StreamingDataset(
            join(self.input_dir, name), max_cache_size=self.max_cache_size,
            cache_dir=self.cache_dir,
        )  # fmt: skip
        n = min(self.metadata["examples"][name], self.max_in_memory)
        examples = [dataset[i] for i in range(n)]
        images = torch.from_numpy(np.stack([e["image"] for e in examples]))
        labels = [e["label"] for e in examples if "label" in e]
        return images, (torch.tensor(labels) if labels else None)

    @functools.cached_property
    def _in_memory(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        self.check()
        return {name: self._read_split(name) for name in SPLITS}

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self._in_memory[name][0] for name in SPLITS)  # type: ignore[return-value]

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.num_classes is None:
            return None
        return tuple(self._in_memory[name][1] for name in SPLITS)  # type: ignore[return-value]

    def training_examples(self) -> int:
        return self.metadata["examples"]["train"]

    def setup(self, stage: str | None = None) -> None:
        """Nothing is loaded: the splits are streamed."""

    def _loader(self, split: str) -> EpochStreamingLoader:
        """litdata's StreamingDataLoader: Lightning keeps its state (epoch, examples yielded) in
        every checkpoint, so a resumed run reads what the uninterrupted one would have. Each
        process reads its own share of the chunks: the trainer's world size and rank are given
        to the data set (as litdata would find them in torch.distributed). The order depends
        only on the run's seed and the epoch; training drops the last, partial batch."""
        train = split == "train"
        # training drops the last, partial batch; validation keeps every example on one process
        # and, in DDP, drops what would leave the ranks with unequal counts (litdata's None)
        drop_last = True if train else None
        self.check()
        dataset = StreamingImages(
            join(self.input_dir, split),
            size=self.metadata["examples"][split],
            num_levels=self.num_levels,
            labels=self.conditional,
            hflip=train and self.hflip,
            shuffle=train,
            drop_last=drop_last,
            seed=self.shuffle_seed % 2**32,  # litdata's RandomState takes 32 bits
            max_cache_size=self.max_cache_size,
            cache_dir=self.cache_dir,
        )
        trainer = self.trainer
        if trainer is not None:
            dataset.distributed_env = _DistributedEnv(
                trainer.world_size, trainer.global_rank, trainer.num_nodes
            )
        return EpochStreamingLoader(
            dataset,
            batch_size=self.per_device_batch_size(dataset.distributed_env.world_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            # the workers' base seed from here, not from the global random state (whose draws
            # are the training step's: a validation's new iterator would move it, see base.py)
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )
