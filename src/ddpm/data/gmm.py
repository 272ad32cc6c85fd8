"""Generated Gaussian mixtures: data whose distribution is known exactly (`ddpm.truth`)."""

from __future__ import annotations

import torch

from ddpm.checks import check_int, check_positive
from ddpm.data.base import PointDataModule
from ddpm.truth import GaussianMixture


def make_mixture(
    dim: int, components: int, spread: float, variance: float, seed: int
) -> GaussianMixture:
    """`components` equally weighted isotropic Gaussians of `variance` in `dim` dimensions, their
    means drawn from N(0, spread^2 I) with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(components, dim, generator=generator, dtype=torch.float64)
    variances, weights = torch.full((components,), variance), torch.ones(components)
    return GaussianMixture(means, variances, weights, torch.arange(components))


class GaussianMixtureDataModule(PointDataModule):
    """Train, val and test sets drawn independently from a seeded Gaussian mixture, which
    `distribution()` returns; an example's label is the component it was drawn from."""

    def __init__(
        self,
        dim: int = 2,
        components: int = 8,
        spread: float = 1.0,
        variance: float = 0.01,
        num_train: int = 20000,
        num_val: int = 2000,
        num_test: int = 2000,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        for key, value in {
            "dim": dim,
            "components": components,
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
        }.items():
            check_int(f"data.{key}", value)
        check_positive("data.spread", spread)
        check_positive("data.variance", variance)
        self.dim, self.seed = dim, seed
        self.mixture = make_mixture(dim, components, float(spread), float(variance), seed)
        self.sizes = (num_train, num_val, num_test)
        super().__init__(batch_size, num_workers)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def distribution(self) -> GaussianMixture:
        return self.mixture

    @property
    def num_classes(self) -> int:
        return self.mixture.num_components

    def _draw(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, k = self.mixture.sample_components(n, torch.Generator().manual_seed(seed))
        return x.float(), k

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            self._draw(n, self.seed + 1 + i)[0] for i, n in enumerate(self.sizes)
        )

    def make_labels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            self._draw(n, self.seed + 1 + i)[1] for i, n in enumerate(self.sizes)
        )

    def second_draw(self, n: int) -> torch.Tensor:
        return self._draw(n, self.seed + 1000)[0]
