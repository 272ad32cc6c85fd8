"""The 8x8 handwritten digits bundled with scikit-learn (1797 images, grey levels 0..16)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from ddpm.data.base import ImageDataModule, seeded_split


class DigitsDataModule(ImageDataModule):
    """UCI digits, levels 0..16 (scaled to [-1, 1] as they are read), split with a fixed seed."""

    num_levels = 17

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 8,
        channels: int = 1,
        num_workers: int = 0,
    ) -> None:
        if image_size != 8 or channels != 1:
            raise ValueError(
                f"data.image_size={image_size!r} and data.channels={channels!r} do not fit "
                "data=digits: its images are 8x8 with 1 channel "
                "(allowed: image_size=8, channels=1)."
            )
        for key, value in {"val_fraction": val_fraction, "test_fraction": test_fraction}.items():
            if not 0.0 < value < 0.5:
                raise ValueError(f"data.{key}={value!r} is invalid: it must lie in (0, 0.5).")
        self.val_fraction, self.test_fraction, self.split_seed = (
            val_fraction,
            test_fraction,
            split_seed,
        )
        super().__init__(batch_size, num_workers)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def _split(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_val, n_test = (round(f * len(data)) for f in (self.val_fraction, self.test_fraction))
        return seeded_split(data, n_val, n_test, self.split_seed)

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(torch.from_numpy(load_digits().images).to(torch.uint8).unsqueeze(1))

    @property
    def num_classes(self) -> int:
        return 10

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._split(torch.from_numpy(load_digits().target).long())
