"""Data sets larger than memory: `ddpm-prepare` writes litdata chunks, `data=streaming` streams
them. The prepared splits are checked against the in-memory data modules they come from, the
sharding by counting every example read on two ranks, memory by measuring a process that
streams a data set five times larger than its cache limit, and the bad inputs by their
sentences. Exact resume after SIGKILL (one process and two DDP processes) is in
tests/test_resume.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_in
from hydra.core.global_hydra import GlobalHydra

from ddpm.cli.prepare import prepare_data
from ddpm.data import DigitsDataModule, ImageFolderDataModule, StreamingDataModule
from ddpm.data.base import SPLITS


def prepare_in(out: Path, tmp: Path, *overrides: str) -> dict:
    """ddpm-prepare's work, in this process, with two writer processes."""
    cfg = compose_in(tmp, [f"out={out}", "num_workers=2", *overrides], config_name="prepare")
    try:
        return prepare_data(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    """The digits in chunks of 16 KB (92 KB of training images: several chunks per split, so
    that the shards and shuffles below deal chunks)."""
    tmp = tmp_path_factory.mktemp("prepared")
    prepare_in(tmp / "digits", tmp, "source=digits", "chunk_bytes=16KB")
    assert len(list((tmp / "digits" / "train").glob("chunk-*.bin"))) >= 4
    return tmp / "digits"


def streaming(input_dir: Path, **kwargs) -> StreamingDataModule:
    meta = json.loads((Path(input_dir) / "ddpm.json").read_text())
    shape = {"image_size": meta["image_size"], "channels": meta["channels"]}
    return StreamingDataModule(str(input_dir), **{**shape, **kwargs})


def test_prepared_digits_are_data_digits(prepared_digits: Path) -> None:
    """Every split, image and label, in the order of data=digits' seeded split; the validation
    loader streams them in that order, in [-1, 1]."""
    digits, streamed = DigitsDataModule(), streaming(prepared_digits, batch_size=32)
    assert streamed.data_shape == digits.data_shape and streamed.num_levels == 17
    assert streamed.num_classes == 10
    for name in SPLITS:
        assert torch.equal(streamed.splits[name], digits.splits[name]), name
        assert torch.equal(streamed.labels(name), digits.labels(name)), name
    capped = streaming(prepared_digits, max_in_memory=100)  # what a score holds: the first 100
    assert torch.equal(capped.splits["train"], digits.splits["train"][:100])
    assert torch.equal(capped.splits["val"], digits.splits["val"][:100])
    streamed.condition_on_labels()
    batches = list(streamed.val_dataloader())
    assert torch.equal(torch.cat([b[0] for b in batches]), digits.val_data)
    assert torch.equal(torch.cat([b[1] for b in batches]), digits.labels("val"))


def test_prepared_image_folder_is_data_image_folder(fake_data: Path, tmp_path: Path) -> None:
    """An image folder with a class per sub-folder: resized, cropped and made grey as
    data=image_folder does, the same splits (other fractions and seed than the defaults) and
    labels, the class names kept."""
    keys = ["image_size=16", "channels=1", "val_fraction=0.25", "test_fraction=0.2", "split_seed=3"]
    meta = prepare_in(tmp_path / "out", tmp_path, f"source={fake_data / 'images'}", *keys)
    folder = ImageFolderDataModule(
        str(fake_data / "images"), image_size=16, channels=1, val_fraction=0.25,
        test_fraction=0.2, split_seed=3,
    )  # fmt: skip
    streamed = streaming(tmp_path / "out")
    assert meta["class_names"] == ["a", "b"] == streamed.class_names()
    assert meta["examples"] == {name: len(folder.splits[name]) for name in SPLITS}
    for name in SPLITS:
        assert torch.equal(streamed.splits[name], folder.splits[name]), name
        assert torch.equal(streamed.labels(name), folder.labels(name)), name


def test_prepared_cifar10_is_data_cifar10(fake_data: Path, tmp_path: Path) -> None:
    """A torchvision set (fake CIFAR-10 files), read from `root` and split by `val_size` as
    data=cifar10 does."""
    from ddpm.data import CIFAR10DataModule

    prepare_in(tmp_path / "out", tmp_path, "source=cifar10", f"root={fake_data}", "val_size=4")
    cifar = CIFAR10DataModule(str(fake_data), val_size=4, image_size=32, channels=3)
    streamed = streaming(tmp_path / "out")
    for name in SPLITS:
        assert torch.equal(streamed.splits[name], cifar.splits[name]), name
        assert torch.equal(streamed.labels(name), cifar.labels(name)), name


def test_every_example_once_per_epoch_across_two_ranks(prepared_digits: Path) -> None:
    """Two ranks of a global batch of 64 for two epochs: within an epoch no example is read
    twice over both ranks, all but fewer than two global batches are read, the ranks yield the
    same number of batches, and the second epoch's order is another."""
    train = DigitsDataModule().splits["train"]
    counts = Counter(bytes(x.numpy()) for x in train)
    epochs: list[list[list[bytes]]] = [[], []]  # per epoch, per rank: the images read
    for rank in (0, 1):
        data = streaming(prepared_digits, batch_size=64)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank, num_nodes=1)
        loader = data.train_dataloader()
        for epoch in range(2):
            levels = [((x + 1) * 8).round().to(torch.uint8) for (x,) in loader]
            assert all(len(b) == 32 for b in levels)
            epochs[epoch].append([bytes(x.numpy()) for b in levels for x in b])
    for ranks in epochs:
        assert len(ranks[0]) == len(ranks[1])
        read = Counter(ranks[0] + ranks[1])
        assert all(read[k] <= counts[k] for k in read)  # each example at most once
        assert sum(read.values()) > len(train) - 2 * 64
    assert epochs[0][0] != epochs[1][0]


def test_flips_mirror_about_half_of_the_examples_anew_each_epoch(prepared_digits: Path) -> None:
    """data.hflip=true against false with the same seed (the same order): every example is
    itself or its mirror image, about half are mirrored (1437 draws: the standard deviation of
    the share is 0.013; mirror-symmetric digits count as not mirrored), in each epoch, and
    each epoch draws its own."""
    plain = streaming(prepared_digits, batch_size=128).train_dataloader()
    flipped = streaming(prepared_digits, batch_size=128, hflip=True).train_dataloader()
    shares = []
    for _ in range(2):
        a = torch.cat([x for (x,) in plain])
        b = torch.cat([x for (x,) in flipped])
        same = (a == b).flatten(1).all(1)
        mirrored = (a.flip(-1) == b).flatten(1).all(1) & ~same
        assert bool((same | mirrored).all())
        shares.append(mirrored)
    assert all(0.4 < float(m.double().mean()) < 0.6 for m in shares), shares
    dataset = flipped.dataset  # the draws themselves: another set each epoch
    dataset.current_epoch = 1
    first = dataset.flips().copy()
    dataset.current_epoch = 2
    assert (first != dataset.flips()).mean() > 0.4


def test_a_loader_with_workers_resumes_mid_epoch_as_the_uninterrupted_one(prepared_digits):
    """data.num_workers=2, flips on: the state after 8 batches, loaded into a new loader, reads
    the rest of that epoch and all of the next as an uninterrupted loader does, batch for batch
    (the end-to-end SIGKILL tests run without workers, the default)."""

    def loader():
        data = streaming(prepared_digits, batch_size=64, hflip=True, num_workers=2)
        return data.train_dataloader()

    whole = loader()
    reference = [x for (x,) in whole] + [x for (x,) in whole]
    first = loader()
    batches = iter(first)
    read = [next(batches)[0] for _ in range(8)]
    state = first.state_dict()
    del batches
    resumed = loader()
    resumed.load_state_dict(state)
    read += [x for (x,) in resumed]  # the rest of the epoch
    read += [x for (x,) in resumed]  # the next one
    assert len(read) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(read, reference, strict=True))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.input_dir={empty}"], "is not a prepared data set (no ddpm.json)"),
        (["data.input_dir={prepared}", "data.image_size=16"], "do not fit the prepared data set"),
        (["data.input_dir={prepared}", "backbone.image_size=16"], "backbone=unet takes examples"),
        (["data.input_dir=s3://ddpm-unreachable/digits"], "cannot be read (EndpointConnection"),
        (["data.input_dir={prepared}", "data.max_cache_size=lots"], "max_cache_size='lots' is"),
        (["data.input_dir={prepared}", "data.max_in_memory=0"], "max_in_memory=0 is invalid"),
        (["data.input_dir={prepared}", "data.num_levels=256"], "differs from the 17 levels"),
    ],
)
def test_bad_streaming_input_is_one_sentence(
    overrides, expected, prepared_digits, tmp_path, monkeypatch
) -> None:
    """Each refused by build(), before any training, in one sentence naming the key. The s3://
    endpoint is a closed local port (with fake credentials): refused in seconds, not retried."""
    from ddpm.cli.common import user_error_message
    from ddpm.cli.train import build

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    (tmp_path / "empty").mkdir()
    keys = [o.format(empty=tmp_path / "empty", prepared=prepared_digits) for o in overrides]
    cfg = compose_in(tmp_path, ["data=streaming", "logger=none", *keys])
    with pytest.raises(Exception) as error:  # noqa: PT011 - what a user sees is the sentence
        build(cfg)
    message = user_error_message(error.value)
    assert message is not None and "\n" not in message, message
    assert expected in message and ("data." in message or "backbone" in expected)


def test_a_streamed_run_samples_without_its_data(tmp_path: Path) -> None:
    """ddpm-sample on another machine: the run's config holds the set's size, channels and
    levels, so samples are stored and shown without the set; what reads it says it is gone."""
    data = StreamingDataModule(str(tmp_path / "gone"), image_size=8, channels=1, num_levels=17)
    stored = data.store(torch.full((2, 1, 8, 8), 1.0))
    assert stored["samples"].shape == (2, 8, 8, 1) and int(stored["num_levels"]) == 17
    assert (stored["samples"] == 16).all() and data.show(torch.zeros(2, 1, 8, 8)).ndim == 3
    with pytest.raises(ValueError, match="is not a prepared data set"):
        data.check()


def test_prepare_refuses_a_folder_that_is_not_empty(prepared_digits, tmp_path, capsys) -> None:
    """Nothing already written is touched: the prepared set is still read the same."""
    before = (prepared_digits / "ddpm.json").read_text()
    with pytest.raises(SystemExit):
        prepare_in(prepared_digits, tmp_path, "source=digits")
    assert "is not empty: choose a new folder" in capsys.readouterr().err
    assert (prepared_digits / "ddpm.json").read_text() == before
    with pytest.raises(SystemExit):
        prepare_in(tmp_path / "new", tmp_path, "source=nothing_here")
    assert "is neither a folder of images nor one of the data sets" in capsys.readouterr().err


def test_prepare_names_an_unreadable_image(fake_data, tmp_path, capsys) -> None:
    """The pass finishes (a worker that raised could leave litdata waiting), then one sentence
    names the file, and no ddpm.json makes the folder a data set."""
    import shutil

    shutil.copytree(fake_data / "images", tmp_path / "images")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit):
        prepare_in(tmp_path / "out", tmp_path, f"source={tmp_path / 'images'}", "image_size=8")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"Error: source='{tmp_path / 'images'}': ")
    assert "broken.png is not a readable image" in last and "1 unreadable image(s)" in last
    assert not (tmp_path / "out" / "ddpm.json").exists()


MEMORY_SCRIPT = """
import sys, os, numpy as np, torch
from ddpm.data import StreamingDataModule

def size(path):  # 0 for a file that litdata deletes while it is being listed
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

data = StreamingDataModule(sys.argv[1], image_size=64, channels=3, batch_size=64,
                           max_cache_size="20MB", cache_dir=sys.argv[2])
before, cache, n = None, 0, 0
for (x,) in data.train_dataloader():
    n += len(x)
    before = before or status("VmRSS")  # the first batch read: the baseline
    cache = max(cache, sum(size(os.path.join(d, f))
                           for d, _, fs in os.walk(sys.argv[2]) for f in fs))
print(n, status("VmHWM") - before, cache)
"""


@pytest.mark.slow
def test_memory_stays_bounded_streaming_five_times_the_cache_limit(tmp_path: Path) -> None:
    """A 98 MB data set (8,000 random 64x64 RGB images, 4 MB chunks) streamed for a whole epoch
    through a cache limited to 20 MB (`local:`: the folder read as if remote): the process's
    peak resident memory grows by less than a third of the data set over its first batch,
    and the cache never holds more than its limit plus one chunk."""
    import litdata
    import numpy as np

    from ddpm.data.streaming import FORMAT, write_metadata

    def example(i: int) -> dict:
        return {"image": np.random.default_rng(i).integers(0, 256, (3, 64, 64), np.uint8)}

    for name, n in {"train": 8000, "val": 64, "test": 64}.items():
        litdata.optimize(
            fn=example, inputs=list(range(n)), output_dir=str(tmp_path / "set" / name),
            chunk_bytes="4MB", num_workers=2, start_method="fork", verbose=False,
        )  # fmt: skip
    write_metadata(str(tmp_path / "set"), {
        "format": FORMAT, "image_size": 64, "channels": 3, "num_levels": 256,
        "num_classes": None, "examples": {"train": 8000, "val": 64, "test": 64},
    })  # fmt: skip
    size = sum(f.stat().st_size for f in (tmp_path / "set").rglob("*.bin"))
    assert size > 5 * 20e6
    script = tmp_path / "stream.py"
    script.write_text(textwrap.dedent(MEMORY_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), f"local:{tmp_path / 'set'}", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    read, growth, cache = map(int, result.stdout.split()[-3:])
    print(f"data set {size / 1e6:.0f} MB: peak RSS growth {growth / 1e6:.1f} MB, "
          f"cache at most {cache / 1e6:.1f} MB, {read} examples read")  # fmt: skip
    assert read == 8000 // 64 * 64
    assert growth < size / 3
    assert cache <= 20e6 + 4.2e6
