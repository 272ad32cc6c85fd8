"""Torchvision's MNIST, Fashion-MNIST and CIFAR-10: 256 grey levels, held in memory as uint8.

The files are read by torchvision from `root`; `download=true` fetches them (on one process per
node, in `prepare_data`). Without it, missing files are one sentence naming the folder and the
files expected there. Validation uses `val_size` images held out from the training set with a
seeded split; `val_size=0` trains on all of them and validates on the test set (the paper has no
validation split).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from ddpm.checks import check_int
from ddpm.data.base import ImageDataModule, seeded_split


class TorchvisionDataModule(ImageDataModule):
    """A torchvision image data set with a train/val/test split; subclasses name the set."""

    num_levels = 256
    dataset_class: type = torchvision.datasets.VisionDataset
    name = ""
    shape: tuple[int, int, int] = (0, 0, 0)  # channels, height, width

    def __init__(
        self,
        root: str,
        download: bool = False,
        val_size: int = 1000,
        split_seed: int = 0,
        image_size: int | None = None,
        channels: int | None = None,
        hflip: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        channels_, size, _ = self.shape
        if (image_size, channels) != (size, channels_):
            raise ValueError(
                f"data.image_size={image_size!r} and data.channels={channels!r} do not fit "
                f"data={self.name}: its images are {size}x{size} with {channels_} channel(s) "
                f"(allowed: image_size={size}, channels={channels_})."
            )
        check_int("data.val_size", val_size, minimum=0)
        super().__init__(batch_size, num_workers, hflip)
        self.root, self.download = Path(root), bool(download)
        self.val_size, self.split_seed = val_size, split_seed

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.shape

    def expected_files(self) -> list[Path]:
        """The files torchvision reads under `root`."""
        raise NotImplementedError

    def check(self) -> None:
        missing = [f for f in self.expected_files() if not f.is_file()]
        if missing and not self.download:
            names = ", ".join(str(f.relative_to(self.root)) for f in self.expected_files())
            raise ValueError(
                f"data.root={str(self.root)!r} lacks the {self.name} files "
                f"(missing {missing[0]}; expected under it: {names}); copy them there, or set "
                "data.download=true on a machine with internet access."
            )

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._read(train, download=True)

    def _read(self, train: bool, download: bool = False, labels: bool = False) -> torch.Tensor:
        """One torchvision split as uint8 [N, C, H, W] (with `labels`: its int64 labels [N])."""
        try:
            dataset = self.dataset_class(str(self.root), train=train, download=download)
        except (RuntimeError, OSError) as error:  # corrupted files, or no internet
            raise ValueError(
                f"data.root={str(self.root)!r}: torchvision could not "
                f"{'download' if download else 'read'} {self.name} ({error}); delete the folder "
                "and download again, or copy the files there."
            ) from error
        if labels:
            return torch.as_tensor(dataset.targets).long()
        data = torch.as_tensor(dataset.data)
        return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)

    @property
    def num_classes(self) -> int:
        return 10  # MNIST, Fashion-MNIST and CIFAR-10 alike

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.make_splits(labels=True)

    def make_splits(self, labels: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        train, test = self._read(True, labels=labels), self._read(False, labels=labels)
        if self.val_size == 0:
            return train, test, test
        if self.val_size >= len(train):
            raise ValueError(
                f"data.val_size={self.val_size} is invalid: it must be below the "
                f"{len(train)} training images of {self.name}."
            )
        train, val, _ = seeded_split(train, self.val_size, 0, self.split_seed)
        return train, val, test


class MNISTDataModule(TorchvisionDataModule):
    """MNIST handwritten digits, 28x28 grey (60,000 train, 10,000 test)."""

    dataset_class = torchvision.datasets.MNIST
    name = "mnist"
    shape = (1, 28, 28)

    def expected_files(self) -> list[Path]:
        raw = self.root / self.dataset_class.__name__ / "raw"
        return [raw / Path(name).stem for name, _ in self.dataset_class.resources]


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST clothing images, 28x28 grey (60,000 train, 10,000 test)."""

    dataset_class = torchvision.datasets.FashionMNIST
    name = "fashion_mnist"


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10, 32x32 colour (50,000 train, 10,000 test)."""

    dataset_class = torchvision.datasets.CIFAR10
    name = "cifar10"
    shape = (3, 32, 32)

    def expected_files(self) -> list[Path]:
        cls = self.dataset_class
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [self.root / cls.base_folder / name for name in names]
