"""What streaming costs the data loader: images per second of one training epoch read from the
same images held in memory (the other image data's StatefulDataLoader), prepared and streamed
in place from a local folder (data=streaming), and streamed through litdata's cache as a remote
set would be (`local:`), side by side in one run; prints each and its ratio to memory.

    python benchmarks/streaming.py                      # 20,000 random 32x32 RGB images
    python benchmarks/streaming.py --images 5000 --size 64 --workers 2

The loader alone is timed (no network): it is what a training step waits for when the loader is
slower than the network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ddpm.data import ImageDataModule, StreamingDataModule
from ddpm.data.streaming import prepare


class RandomImages(ImageDataModule):
    """`n` random uint8 images held in memory (the in-memory data modules' loader)."""

    def __init__(self, n: int, size: int, batch_size: int, num_workers: int) -> None:
        super().__init__(batch_size, num_workers, hflip=True)
        self.n, self.size = n, size

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (3, self.size, self.size)

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (self.n, 3, self.size, self.size), generator=g)
        images = images.to(torch.uint8)
        return images, images[:256], images[:256]


def images_per_second(loader: torch.utils.data.DataLoader, epochs: int) -> float:
    """Read `epochs` epochs (the first one also counted: it is what a run pays)."""
    started, n = time.perf_counter(), 0
    for _ in range(epochs):
        for (x,) in loader:
            n += len(x)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    memory = RandomImages(args.images, args.size, args.batch, args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(memory, str(Path(tmp) / "set"), num_workers=2, chunk_bytes="16MB")
        shape = {"image_size": args.size, "channels": 3, "hflip": True}
        common = {"batch_size": args.batch, "num_workers": args.workers, **shape}
        in_place = StreamingDataModule(str(Path(tmp) / "set"), **common)
        cached = StreamingDataModule(
            f"local:{Path(tmp) / 'set'}", cache_dir=str(Path(tmp) / "cache"), **common
        )
        rates = {
            name: images_per_second(data.train_dataloader(), args.epochs)
            for name, data in (("memory", memory), ("streamed", in_place), ("cached", cached))
        }
    size_mb = args.images * 3 * args.size**2 / 1e6
    print(f"{args.images} images of 3x{args.size}x{args.size} ({size_mb:.0f} MB), batch "
          f"{args.batch}, {args.workers} worker(s), {args.epochs} epochs, flips on")  # fmt: skip
    for name, rate in rates.items():
        print(f"  {name:9s} {rate:10.0f} images/s   {rate / rates['memory']:.2f} x memory")


if __name__ == "__main__":
    main()
