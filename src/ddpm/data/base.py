"""What the data modules share: splits held in memory, the global batch, samplers, loaders, and
what their examples are (images on levels, or points) and how they are shown, stored and
scored."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ddpm.checks import check_int
from ddpm.distributed import batch_seed
from ddpm.figures import (
    image_grid,
    image_trajectory_figure,
    point_trajectory_figure,
    scatter_plot,
)
from ddpm.truth import GaussianMixture

SPLITS = ("train", "val", "test")


class SplitDataset(Dataset):
    """One split as model inputs: integer levels 0..L-1 are scaled to [-1, 1] per example (so
    that large image sets stay uint8 in memory); a key `(index, flip)` mirrors the image. With
    `labels` an example is (x, y), else (x,)."""

    def __init__(
        self, data: torch.Tensor, num_levels: int | None, labels: torch.Tensor | None = None
    ) -> None:
        self.data, self.num_levels, self.labels = data, num_levels, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, ...]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        x = to_model_range(self.data[index], self.num_levels)
        x = x.flip(-1) if flip else x
        return (x,) if self.labels is None else (x, self.labels[index])


def to_model_range(data: torch.Tensor, num_levels: int | None) -> torch.Tensor:
    """Integer levels 0..num_levels-1 -> float in [-1, 1]; continuous data as float."""
    if num_levels is None:
        return data.float()
    return data.float() * (2.0 / (num_levels - 1)) - 1.0


def seeded_split(
    data: torch.Tensor, n_val: int, n_test: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test): a permutation seeded by `seed` puts the first `n_val` examples in
    val, the next `n_test` in test and the rest in train."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return data[train], data[val], data[test]


class EpochSampler(StatefulDistributedSampler):
    """torch's DistributedSampler (this rank's share, in an order drawn from the run's seed and
    the epoch), yielding `(index, flip)` with random horizontal flips when `hflip`.

    It counts its own epochs (passes over the data) and keeps the epoch, with torchdata's count
    of examples yielded, in every checkpoint's loader state. Lightning's epoch is not used: on a
    resume Lightning builds the loader's iterator before it sets the sampler's epoch (so a run
    resumed in epoch e > 0 would replay epoch 0's order), and a run resumed from a checkpoint
    written at the last batch of an epoch skips one of Lightning's epoch numbers. The flips come
    from a generator seeded by the seed and the epoch, not from the global random state.
    """

    def __init__(self, dataset: Dataset, hflip: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.hflip = hflip
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the sampler counts its passes itself (see the class docstring)."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # the pass resumes after the examples yielded
        self.epoch = state_dict["epoch"]

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: this runs at the first draw, so an iterator that is made and dropped
        # (as torchdata does before loading a state) does not count as a pass.
        if self.next_yielded is None:  # a new pass, not one resumed from a checkpoint
            self.epoch = self.next_epoch
        self.next_epoch = self.epoch + 1
        indices = super().__iter__()
        if not self.hflip:
            yield from indices
            return
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch + 1))
        flips = (torch.rand(len(self.dataset), generator=g) < 0.5).tolist()  # type: ignore[arg-type]
        for i in indices:
            yield i, flips[i]


class TensorDataModule(pl.LightningDataModule):
    """A data module whose three splits `make_splits()` returns as tensors: uint8 levels for
    quantised data (`num_levels` set), float for continuous data. They are built on first use;
    `check()` finds missing files first, in one sentence, and `prepare_data()` downloads.

    What the examples are is said by the subclass (`ImageDataModule` or `PointDataModule`): how
    samples are shown (`show`, `show_trajectory`), stored (`store`) and scored (`scores`).
    """

    num_levels: int | None = None
    scores: tuple[str, ...] = ()  # how ddpm-eval scores samples: "fid", "distances"
    trajectory_examples = 8  # how many samples a trajectory figure follows

    def show(
        self, samples: torch.Tensor, title: str = "", per_row: int | None = None
    ) -> np.ndarray:
        """Samples as a picture, a uint8 [H, W, 3] array (images: `per_row` to a row, e.g. one
        row per class)."""
        raise NotImplementedError

    def show_trajectory(self, trajectory: list) -> np.ndarray:
        """x_t and the predicted x_0 at marked times along a chain, as a picture."""
        raise NotImplementedError

    def store(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        """Samples as the arrays of samples.npz."""
        raise NotImplementedError

    def __init__(self, batch_size: int, num_workers: int = 0, hflip: bool = False) -> None:
        super().__init__()
        check_int("data.batch_size", batch_size)
        check_int("data.num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = bool(hflip)
        # The order of the training data comes from the run's seed (set before this is built),
        # taken now, while every process has the same one.
        self.shuffle_seed = torch.initial_seed() % 2**63

    @property
    def data_shape(self) -> tuple[int, ...]:
        """The shape of one example, known without loading the data."""
        raise NotImplementedError

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def check(self) -> None:
        """Raise a one-sentence ValueError when the files the data needs are missing."""

    def distribution(self) -> GaussianMixture | None:
        """The data's exact distribution when it is known (`ddpm.truth`), else None."""
        return None

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The class labels of the three splits (int64, aligned with `make_splits`), or None for
        data without labels."""
        return None

    @property
    def num_classes(self) -> int | None:
        """The number of classes of labelled data (labels 0..num_classes-1), else None."""
        return None

    @functools.cached_property
    def label_splits(self) -> dict[str, torch.Tensor] | None:
        labels = self.make_labels()
        return None if labels is None else dict(zip(SPLITS, labels, strict=True))

    def labels(self, name: str) -> torch.Tensor | None:
        """The class labels of split `name` (what the sample score's classifier learns, what a
        conditional model is trained on), or None."""
        return None if self.label_splits is None else self.label_splits[name]

    # conditioning=class: batches are (x, y) (`condition_on_labels`)
    conditional = False

    def condition_on_labels(self) -> int:
        """Serve (x, y) batches from here on, for `conditioning=class`; the number of classes.
        Data without labels is a one-sentence ValueError."""
        if self.num_classes is None:
            name = type(self).__name__.removesuffix("DataModule")
            raise ValueError(
                f"conditioning=class needs labelled data, but {name} data have no labels: "
                "allowed are digits, mnist, fashion_mnist, cifar10, gmm, toy2d with "
                "data.name=8gaussians, image_folder with one sub-folder per class and "
                "streaming of a labelled set; or conditioning=none."
            )
        self.conditional = True
        return self.num_classes

    @functools.cached_property
    def splits(self) -> dict[str, torch.Tensor]:
        self.check()
        return dict(zip(SPLITS, (t.contiguous() for t in self.make_splits()), strict=True))

    def split(self, name: str) -> torch.Tensor:
        """The whole split `name` as model inputs (float, images in [-1, 1])."""
        return to_model_range(self.splits[name], self.num_levels)

    @property
    def train_data(self) -> torch.Tensor:
        return self.split("train")

    @property
    def val_data(self) -> torch.Tensor:
        return self.split("val")

    @property
    def test_data(self) -> torch.Tensor:
        return self.split("test")

    def per_device_batch_size(self, world_size: int) -> int:
        """The global `batch_size` divided evenly over `world_size` processes."""
        if self.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                f"the {world_size} devices x nodes of the trainer."
            )
        return self.batch_size // world_size

    def training_examples(self) -> int:
        """How many training examples there are (here: the split, loaded)."""
        return len(self.splits["train"])

    def check_training_batches(self, world_size: int) -> None:
        """Count the training examples (data held in memory: loading the splits, whose own
        errors are one sentence) and refuse a global batch larger than the training split, which
        would train no step at all (the last, partial batch is dropped). Skipped while a
        download is pending (the files come in `prepare_data`)."""
        if getattr(self, "download", False):
            return
        per_device = self.per_device_batch_size(world_size)
        total = self.training_examples()
        if total // world_size < per_device:
            name = type(self).__name__.removesuffix("DataModule")
            raise ValueError(
                f"data.batch_size={self.batch_size} leaves no training batch: {name} has "
                f"{total} training examples for {world_size} process(es); lower data.batch_size."
            )

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - load now, not inside the first training step

    def _loader(self, split: str) -> DataLoader:
        """A torchdata StatefulDataLoader: Lightning saves how far it got in every checkpoint, so
        a resumed run sees the same batches as an uninterrupted one. Each process reads its own
        share through an EpochSampler (the trainer runs with `use_distributed_sampler=False`):
        the order depends only on the run's seed and the epoch, so it survives a resume and the
        global random state is left to the training step."""
        train = split == "train"
        labels = self.labels(split) if self.conditional else None
        dataset = SplitDataset(self.splits[split], self.num_levels, labels)
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = EpochSampler(
            dataset,
            hflip=train and self.hflip,
            num_replicas=world_size,
            rank=rank,
            shuffle=train,
            seed=self.shuffle_seed,
            drop_last=train,
        )
        return StatefulDataLoader(
            dataset,
            batch_size=self.per_device_batch_size(world_size),
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Each new iterator (every epoch, every validation) draws its workers' base seed from
            # this generator rather than from the global random state, which would otherwise
            # move between a checkpoint and the next training step and break exact resumes.
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class ImageDataModule(TensorDataModule):
    """Images C x H x W on `num_levels` evenly spaced values in [-1, 1]: shown as a grid, stored
    as uint8 levels, scored by the bound in bits/dim and by FID/KID."""

    num_levels: int = 256
    scores = ("fid",)

    def show(
        self, samples: torch.Tensor, title: str = "", per_row: int | None = None
    ) -> np.ndarray:
        """The first 64 samples as a square grid (small images upscaled, nearest-neighbour), or
        with `per_row`, all of them that many to a row (at most 16 rows)."""
        if per_row is None:
            return image_grid(samples[:64])
        return image_grid(samples[: 16 * per_row], nrow=per_row)

    def show_trajectory(self, trajectory: list) -> np.ndarray:
        return image_trajectory_figure(trajectory)

    def store(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        """`samples`: uint8 NHWC on the data's own levels 0..num_levels-1, and `num_levels`."""
        levels = self.num_levels
        q = ((samples.clamp(-1, 1) + 1) / 2 * (levels - 1)).round().to(torch.uint8)
        return {"samples": q.permute(0, 2, 3, 1).numpy(), "num_levels": np.array(levels)}


class PointDataModule(TensorDataModule):
    """Continuous points (vectors): shown as a scatter plot over the validation split, stored as
    float32, scored by distances between point clouds."""

    scores = ("distances",)
    trajectory_examples = 1000

    def show(
        self, samples: torch.Tensor, title: str = "", per_row: int | None = None
    ) -> np.ndarray:
        return scatter_plot(samples, self.val_data, title=title)

    def show_trajectory(self, trajectory: list) -> np.ndarray:
        return point_trajectory_figure(trajectory)

    def store(self, samples: torch.Tensor) -> dict[str, np.ndarray]:
        return {"samples": samples.float().numpy()}

    def second_draw(self, n: int) -> torch.Tensor:
        """n more points from the data's distribution, independent of the splits (the floor of a
        distance between samples and held-out points)."""
        raise NotImplementedError
