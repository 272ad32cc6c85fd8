"""Generated 2-D toy distributions, each scaled to roughly [-2, 2]^2."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import make_moons, make_swiss_roll

from ddpm.data.base import PointDataModule
from ddpm.truth import GaussianMixture

TOY2D_NAMES = ("swissroll", "moons", "8gaussians", "checkerboard")


def make_toy2d(name: str, n: int, seed: int) -> np.ndarray:
    """n points of the toy distribution `name`, float [n, 2], reproducible from `seed`."""
    return make_toy2d_labelled(name, n, seed)[0]


def make_toy2d_labelled(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`make_toy2d`'s points and, for 8gaussians, each point's mode k (at angle 2 pi k / 8)."""
    rng = np.random.default_rng(seed)
    labels = None
    if name == "swissroll":
        x = make_swiss_roll(n, noise=0.5, random_state=seed)[0][:, [0, 2]] / 6.0
    elif name == "moons":
        x = (make_moons(n, noise=0.05, random_state=seed)[0] - [0.5, 0.25]) * 1.6
    elif name == "8gaussians":
        labels = rng.integers(0, 8, n)
        angles = labels * (2 * math.pi / 8)
        centers = 1.6 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        x = centers + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        x = np.stack([x1, x2], axis=1)
    else:
        raise ValueError(f"data.name={name!r} is unknown: allowed are {', '.join(TOY2D_NAMES)}.")
    return x.astype(np.float32), labels


class Toy2DDataModule(PointDataModule):
    """Train, val and test sets drawn independently from the same toy distribution."""

    def __init__(
        self,
        name: str = "swissroll",
        num_train: int = 20000,
        num_val: int = 2000,
        num_test: int = 2000,
        seed: int = 0,
        batch_size: int = 256,
        dim: int = 2,
        num_workers: int = 0,
    ) -> None:
        if name not in TOY2D_NAMES:
            raise ValueError(
                f"data.name={name!r} is unknown: allowed are {', '.join(TOY2D_NAMES)}."
            )
        if dim != 2:
            raise ValueError(
                f"data.dim={dim!r} does not fit data=toy2d: its points are 2-D (allowed: 2)."
            )
        for key, value in {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
        }.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{key}={value!r} is invalid: it must be an integer >= 1.")
        self.name, self.seed = name, seed
        self.sizes = (num_train, num_val, num_test)
        super().__init__(batch_size, num_workers)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (2,)

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            torch.from_numpy(make_toy2d(self.name, n, self.seed + i))
            for i, n in enumerate(self.sizes)
        )

    @property
    def num_classes(self) -> int | None:
        """8gaussians: its 8 modes; the other sets have no labels."""
        return 8 if self.name == "8gaussians" else None

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.num_classes is None:
            return None
        return tuple(  # type: ignore[return-value]
            torch.from_numpy(make_toy2d_labelled(self.name, n, self.seed + i)[1]).long()
            for i, n in enumerate(self.sizes)
        )

    def distribution(self) -> GaussianMixture | None:
        """8gaussians: 8 equally weighted N(1.6 (cos a, sin a), 0.01 I), a = 2 pi k / 8; the
        other sets have no mixture form (None)."""
        if self.name != "8gaussians":
            return None
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        means = 1.6 * torch.stack([angles.cos(), angles.sin()], dim=1)
        return GaussianMixture(means, torch.full((8,), 0.1**2), torch.ones(8), torch.arange(8))

    def second_draw(self, n: int) -> torch.Tensor:
        return torch.from_numpy(make_toy2d(self.name, n, self.seed + 1000))
