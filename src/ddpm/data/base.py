"""What the in-memory data modules share: splits as tensors, the global batch, the loaders."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader


class TensorDataModule(pl.LightningDataModule):
    """A data module whose three splits are tensors built by `make_splits()` in `__init__`."""

    num_levels: int | None = None

    def __init__(self, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"data.batch_size={batch_size!r} is invalid: it must be an integer >= 1."
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"data.num_workers={num_workers!r} is invalid: it must be an integer >= 0."
            )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_data, self.val_data, self.test_data = (
            t.float().contiguous() for t in self.make_splits()
        )

    def make_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train_data.shape[1:])

    def per_device_batch_size(self, world_size: int) -> int:
        """The global `batch_size` divided evenly over `world_size` processes."""
        if self.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by "
                f"the {world_size} devices x nodes of the trainer."
            )
        return self.batch_size // world_size

    def _loader(self, data: torch.Tensor, train: bool) -> DataLoader:
        """A torchdata StatefulDataLoader: Lightning saves how far it got in every checkpoint, so
        a resumed run sees the same batches as an uninterrupted one. Training batches are
        shuffled by a permutation that depends only on the run's seed and the epoch (torch's
        DistributedSampler, whose epoch Lightning sets; with DDP Lightning puts its own in), so
        the order survives a resume and the global random state is left to the training step."""
        dataset = TensorDataset(data)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        sampler = None
        if train and world_size == 1:
            seed = torch.initial_seed() % 2**63
            sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return StatefulDataLoader(
            dataset,
            batch_size=self.per_device_batch_size(world_size),
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_data, train=False)
