"""Sampling and evaluation on several processes started by torchrun: each process takes every
world-th batch, and the results are gathered in batch order, so the output does not depend on
the number of processes (each batch has its own seed). Training uses Lightning's DDP instead."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, number of processes); sets up the process group (NCCL on GPUs, else Gloo) on first
    use when torchrun started several processes (WORLD_SIZE > 1)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), size


def my_share(items: Sequence[T]) -> list[tuple[int, T]]:
    """This process's (index, item) pairs: every world-th item, starting at its rank."""
    rank, size = world()
    return [(i, items[i]) for i in range(rank, len(items), size)]


def gather_in_order(pairs: list[tuple[int, Any]]) -> list[Any]:
    """Every process's (index, result) pairs, on every process, as one list in index order."""
    _, size = world()
    if size == 1:
        return [result for _, result in sorted(pairs, key=lambda p: p[0])]
    everything: list[Any] = [None] * size
    dist.all_gather_object(everything, pairs)
    merged = sorted((p for part in everything for p in part), key=lambda p: p[0])
    return [result for _, result in merged]


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of a run seeded with `seed`."""
    return (seed * 1_000_003 + index) % 2**63
