"""Any folder of images (searched recursively), resized and center-cropped to a square."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ddpm.checks import check_int
from ddpm.data.base import ImageDataModule, seeded_split

MODES = {1: "L", 3: "RGB"}


class ImageFolderDataModule(ImageDataModule):
    """Every image under `root`: its shorter side resized to `image_size` (antialiased), then
    center-cropped, with `channels` 1 (grey) or 3 (RGB); 256 levels, held in memory as uint8,
    split into train/val/test by a seeded permutation. When every image lies in a sub-folder of
    `root`, each sub-folder is a class (sorted by name, as torchvision's ImageFolder)."""

    num_levels = 256
    root_key = "data.root"  # the key errors name (ddpm-prepare: source)

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        hflip: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        check_int("data.image_size", image_size)
        if channels not in MODES:
            raise ValueError(
                f"data.channels={channels!r} is invalid for data=image_folder: allowed are 1 "
                "(grey) and 3 (RGB)."
            )
        for key, value in {"val_fraction": val_fraction, "test_fraction": test_fraction}.items():
            if not 0.0 < value < 0.5:
                raise ValueError(f"data.{key}={value!r} is invalid: it must lie in (0, 0.5).")
        super().__init__(batch_size, num_workers, hflip)
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        self.fractions, self.split_seed = (val_fraction, test_fraction), split_seed
        self._files: list[Path] | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def files(self) -> list[Path]:
        """The image files under `root`, sorted, so the split is the same on every machine
        (listed once: a folder of millions takes a while)."""
        if self._files is None:
            found = self.root.rglob("*")
            images = (p for p in found if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            self._files = sorted(images)
        return self._files

    def class_names(self) -> list[str] | None:
        """The sub-folders of `root` holding the images (the classes), or None when an image lies
        in `root` itself."""
        folders = [p.relative_to(self.root).parts for p in self.files()]
        if any(len(parts) == 1 for parts in folders):
            return None
        return sorted({parts[0] for parts in folders})

    @property
    def num_classes(self) -> int | None:
        names = self.class_names() if self.root.is_dir() else None
        return None if not names else len(names)

    def split_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The positions in `files()` of the (train, val, test) images: a seeded permutation."""
        n = len(self.files())
        n_val, n_test = (max(1, round(f * n)) for f in self.fractions)
        return seeded_split(torch.arange(n), n_val, n_test, self.split_seed)

    def file_labels(self) -> list[int] | None:
        """The class of each of `files()` (its sub-folder's rank), or None without classes."""
        names = self.class_names()
        if not names:
            return None
        index = {name: i for i, name in enumerate(names)}
        return [index[p.relative_to(self.root).parts[0]] for p in self.files()]

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        labels = self.file_labels()
        if labels is None:
            return None
        return tuple(torch.tensor(labels)[i] for i in self.split_indices())  # type: ignore[return-value]

    def check(self) -> None:
        if not self.root.is_dir():
            raise ValueError(
                f"{self.root_key}={str(self.root)!r} is not a folder: data=image_folder needs a "
                "folder of images."
            )
        files = self.files()
        if len(files) < 3:
            raise ValueError(
                f"{self.root_key}={str(self.root)!r} holds {len(files)} image(s): "
                "data=image_folder needs at least 3 (one per split), with extensions "
                f"{', '.join(IMG_EXTENSIONS)}."
            )

    def load(self, path: Path) -> torch.Tensor:
        """One image file as uint8 [C, H, W]: resized (shorter side) and center-cropped."""
        resize = v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.image_size, antialias=True),
                v2.CenterCrop(self.image_size),
            ]
        )
        try:
            with Image.open(path) as image:
                return resize(image.convert(MODES[self.channels]))
        except OSError as error:
            raise ValueError(
                f"{self.root_key}={str(self.root)!r}: {path} is not a readable image ({error})."
            ) from error

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.stack([self.load(path) for path in self.files()])
        return tuple(x[i] for i in self.split_indices())  # type: ignore[return-value]
