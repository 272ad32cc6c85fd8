"""Data modules: digits levels and splits, toy 2-D sets, the global batch and bad settings."""

import pytest
import torch
from sklearn.datasets import load_digits

from ddpm.data import TOY2D_NAMES, DigitsDataModule, Toy2DDataModule


def test_digits_are_17_levels_in_minus_one_to_one() -> None:
    dm = DigitsDataModule()
    assert dm.num_levels == 17
    x = torch.cat([dm.train_data, dm.val_data, dm.test_data])
    assert x.shape == (1797, 1, 8, 8)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    levels = (x + 1) / 2 * 16
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert len(levels.round().unique()) == 17


def test_digits_splits_are_fixed_and_disjoint() -> None:
    a, b = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=0)
    assert torch.equal(a.val_data, b.val_data) and torch.equal(a.train_data, b.train_data)
    assert (len(a.train_data), len(a.val_data), len(a.test_data)) == (1437, 180, 180)
    # Together the splits are exactly the 1797 images, each once (compared as sorted rows).
    rows = lambda t: sorted(tuple(r.flatten().tolist()) for r in t)  # noqa: E731
    full = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16 * 2 - 1
    assert rows(torch.cat([a.train_data, a.val_data, a.test_data])) == rows(full)
    c = DigitsDataModule(split_seed=1)
    assert not torch.equal(a.val_data, c.val_data)


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_toy2d_is_seeded_and_bounded(name: str) -> None:
    a = Toy2DDataModule(name=name, num_train=500, num_val=100, num_test=100, seed=3)
    b = Toy2DDataModule(name=name, num_train=500, num_val=100, num_test=100, seed=3)
    assert torch.equal(a.train_data, b.train_data)
    assert a.train_data.shape == (500, 2) and a.data_shape == (2,)
    assert not torch.equal(a.train_data[:100], a.val_data)
    assert a.train_data.abs().max().item() < 3.5
    assert a.num_levels is None


def test_global_batch_is_split_over_devices() -> None:
    dm = DigitsDataModule(batch_size=128)
    assert dm.per_device_batch_size(1) == 128
    assert dm.per_device_batch_size(4) == 32
    with pytest.raises(
        ValueError, match=r"data.batch_size=128 is the global batch.*divisible by the 3"
    ):
        dm.per_device_batch_size(3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"batch_size": 0}, r"data.batch_size=0 is invalid"),
        ({"image_size": 16}, r"data.image_size=16 .* do not fit data=digits"),
        ({"channels": 3}, r"data.channels=3 do not fit data=digits"),
        ({"val_fraction": 0.7}, r"data.val_fraction=0.7 is invalid"),
    ],
)
def test_bad_digits_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DigitsDataModule(**kwargs)


def test_unknown_toy2d_name() -> None:
    with pytest.raises(ValueError, match=r"data.name='spiral' is unknown: allowed are swissroll"):
        Toy2DDataModule(name="spiral")
