"""Data modules: digits levels and splits, toy 2-D sets, torchvision files and image folders
(fake files), samplers and flips, the global batch and bad settings."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fake_data import write_cifar10, write_image_folder, write_mnist
from PIL import Image
from sklearn.datasets import load_digits

from ddpm.data import (
    TOY2D_NAMES,
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    Toy2DDataModule,
)
from ddpm.data.base import EpochSampler, SplitDataset


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
        ({"num_workers": -1}, r"data.num_workers=-1 is invalid: it must be an integer >= 0"),
    ],
)
def test_bad_digits_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        DigitsDataModule(**kwargs)


def test_loader_workers_give_the_same_batches() -> None:
    """`data.num_workers`: batches read by worker processes equal those read in this one."""
    batches = {}
    for workers in (0, 2):
        dm = DigitsDataModule(batch_size=64, num_workers=workers)
        dm.setup("fit")
        batches[workers] = [batch[0] for batch in dm.train_dataloader()]
    assert len(batches[0]) == len(batches[2]) > 1
    for ours, theirs in zip(batches[0], batches[2], strict=True):
        assert torch.equal(ours, theirs)


def test_unknown_toy2d_name() -> None:
    with pytest.raises(ValueError, match=r"data.name='spiral' is unknown: allowed are swissroll"):
        Toy2DDataModule(name="spiral")


# --- files read through torchvision, and folders of images (fake files, never downloads) ---


def test_mnist_reads_torchvision_files_and_holds_out_val(tmp_path: Path) -> None:
    images = write_mnist(tmp_path, n_train=40, n_test=10)
    dm = MNISTDataModule(root=str(tmp_path), val_size=6, image_size=28, channels=1)
    assert dm.num_levels == 256 and dm.data_shape == (1, 28, 28)
    assert (len(dm.train_data), len(dm.val_data), len(dm.test_data)) == (34, 6, 10)
    expected_test = torch.from_numpy(images["t10k"]).double().unsqueeze(1) / 255 * 2 - 1
    assert torch.allclose(dm.test_data.double(), expected_test, atol=1e-6)
    # train + val are the 40 training images, each once.
    rows = lambda t: sorted(tuple(r.flatten().tolist()) for r in t)  # noqa: E731
    got = torch.cat([dm.train_data, dm.val_data]).double()
    assert rows(((got + 1) * 127.5).round()) == rows(torch.from_numpy(images["train"]).double())
    everything = MNISTDataModule(root=str(tmp_path), val_size=0, image_size=28, channels=1)
    assert len(everything.train_data) == 40 and torch.equal(everything.val_data, dm.test_data)


def test_fashion_mnist_reads_its_own_folder(tmp_path: Path) -> None:
    images = write_mnist(tmp_path, folder="FashionMNIST", n_train=12, n_test=4)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=2, image_size=28, channels=1)
    assert torch.equal(dm.splits["test"], torch.from_numpy(images["t10k"]).unsqueeze(1))


def test_cifar10_reads_the_python_pickles(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    images = write_cifar10(tmp_path, per_batch=8)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=5, image_size=32, channels=3)
    assert dm.data_shape == (3, 32, 32) and dm.hflip is False
    assert torch.equal(dm.splits["test"], torch.from_numpy(images["test"]).permute(0, 3, 1, 2))
    assert (len(dm.train_data), len(dm.val_data)) == (35, 5)


@pytest.mark.parametrize(
    ("cls", "shape"), [(MNISTDataModule, (28, 1)), (CIFAR10DataModule, (32, 3))]
)
def test_missing_files_name_the_folder_and_the_download_key(tmp_path: Path, cls, shape) -> None:
    dm = cls(root=str(tmp_path / "nowhere"), image_size=shape[0], channels=shape[1])
    expected = "train-images-idx3-ubyte" if cls is MNISTDataModule else "data_batch_1"
    with pytest.raises(ValueError, match=rf"data.root=.*nowhere.*lacks the .*{expected}.*download"):
        dm.check()


def test_torchvision_shape_must_match(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.image_size=32 .* do not fit data=mnist"):
        MNISTDataModule(root=str(tmp_path), image_size=32, channels=1)


def test_image_folder_resizes_crops_and_splits(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "wide", n=12, size=(48, 40))
    dm = ImageFolderDataModule(root=str(tmp_path / "wide"), image_size=16, channels=3)
    assert dm.data_shape == (3, 16, 16)
    x = torch.cat([dm.splits[s] for s in ("train", "val", "test")])
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    assert (len(dm.splits["val"]), len(dm.splits["test"])) == (1, 1)
    grey = ImageFolderDataModule(root=str(tmp_path / "wide"), image_size=8, channels=1)
    assert grey.train_data.shape[1:] == (1, 8, 8)


def test_image_folder_keeps_images_of_the_right_size_unchanged(tmp_path: Path) -> None:
    write_image_folder(tmp_path, n=6, size=(16, 16))
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, channels=3, val_fraction=0.2)
    pngs = sorted(p for p in tmp_path.rglob("*.png"))  # lossless files only
    on_disk = {np.asarray(Image.open(p)).tobytes() for p in pngs}
    held = {x.permute(1, 2, 0).numpy().tobytes() for s in dm.splits.values() for x in s}
    assert on_disk <= held


@pytest.mark.parametrize("make", ["missing", "empty", "no_images"])
def test_image_folder_without_images_is_one_sentence(tmp_path: Path, make: str) -> None:
    root = tmp_path / "images"
    if make != "missing":
        root.mkdir()
    if make == "no_images":
        (root / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root=str(root))
    pattern = "is not a folder" if make == "missing" else r"holds 0 image\(s\)"
    with pytest.raises(ValueError, match=rf"data.root=.*images.*{pattern}"):
        dm.check()


def test_samplers_give_each_rank_a_disjoint_share() -> None:
    dataset = list(range(10))
    shares = [
        list(EpochSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=3, drop_last=True))
        for r in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) == 5
    assert sorted(shares[0] + shares[1]) == dataset


def test_flips_depend_on_seed_and_epoch_only() -> None:
    dataset = list(range(400))

    def sampler() -> EpochSampler:
        return EpochSampler(dataset, hflip=True, num_replicas=1, rank=0, shuffle=True, seed=5)

    first = list(sampler())
    assert first == list(sampler())  # the same seed and epoch give the same order and flips
    flips = [flip for _, flip in first]
    assert 150 < sum(flips) < 250  # about half, binomial(400, 1/2): mean 200, sd 10
    counting = sampler()
    assert list(counting) == first
    assert [f for _, f in sorted(counting)] != [f for _, f in sorted(first)]  # epoch 1
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    data = SplitDataset(x, num_levels=None)
    assert torch.equal(data[(0, True)][0], x[0].flip(-1)) and torch.equal(data[0][0], x[0])


def test_sampler_resumes_its_epoch_and_position_from_its_state() -> None:
    """A loader's state restores the epoch and the examples yielded, whatever epoch Lightning
    sets (it builds the iterator before setting the epoch, and may skip a number on resume)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        sampler = EpochSampler(list(range(40)), num_replicas=1, rank=0, shuffle=True, seed=1)
        return StatefulDataLoader(list(range(40)), batch_size=8, sampler=sampler)

    running = loader()
    epochs = [[b.tolist() for b in running] for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    partial = loader()
    list(partial)  # epoch 0
    it = iter(partial)  # epoch 1: three batches, then a checkpoint
    taken = [next(it).tolist() for _ in range(3)]
    state = partial.state_dict()
    resumed = loader()
    resumed.sampler.set_epoch(5)  # ignored: the state says which epoch this is
    resumed.load_state_dict(state)
    assert taken + [b.tolist() for b in resumed] == epochs[1]
    assert [b.tolist() for b in resumed] == epochs[2]
