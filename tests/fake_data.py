"""Small fake data sets written in the formats torchvision reads, and a folder of images."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 10) -> dict:
    """Fake MNIST-format files under root/<folder>/raw; returns the images written."""
    rng = np.random.default_rng(0)
    images = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images[prefix])
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return images


def write_cifar10(root: Path, per_batch: int = 8) -> dict:
    """Fake CIFAR-10 python pickles under root/cifar-10-batches-py; returns the images (NHWC).
    torchvision checks their md5 sums, so a test must switch that check off."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": data, "labels": rng.integers(0, 10, per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        images["test" if name == "test_batch" else "train"].append(
            data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        )
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]})
    )
    return {k: np.concatenate(v) for k, v in images.items()}


def write_image_folder(root: Path, n: int = 12, size: tuple[int, int] = (48, 40)) -> None:
    """n RGB images of `size` (width, height) in two subfolders, as PNG and JPEG."""
    rng = np.random.default_rng(2)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"{i}.{'png' if i % 3 else 'jpg'}")
