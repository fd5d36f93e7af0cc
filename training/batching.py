"""Batching: which examples make each global batch (balanced over objectives, or shuffled), and
their split over ranks and micro batches. Every batch is a pure function of ``(seed, step)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class BalancedBatches:
    """Global batches with ``batch_size // H`` rows of each objective, shuffled together.

    ``mode="truncate"``: each epoch uses a fresh random subset of every objective of the smallest
    objective's size (the paper). ``mode="replacement"``: every objective is drawn up to the largest
    one's size; smaller ones are re-drawn, cycling through fresh shuffles, so each example repeats
    at most ``ceil(largest / size)`` times per epoch. The batch at a step is a pure function of
    ``(seed, step)``: resuming needs only the step.
    """

    sizes: Sequence[int]
    batch_size: int
    mode: str = "truncate"
    seed: int = 0
    _epoch_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        h = len(self.sizes)
        if h == 0 or any(n <= 0 for n in self.sizes):
            raise ValueError(f"every objective needs at least one example, got sizes {list(self.sizes)}")
        if self.mode not in ("truncate", "replacement"):
            raise ValueError(f"balance mode must be 'truncate' or 'replacement', got {self.mode!r}")
        if self.batch_size <= 0 or self.batch_size % h:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of the "
                             f"number of objectives ({h})")
        self.per_objective = self.batch_size // h
        per_epoch = min(self.sizes) if self.mode == "truncate" else max(self.sizes)
        self.steps_per_epoch = per_epoch // self.per_objective
        if self.steps_per_epoch == 0:
            raise ValueError(f"{per_epoch} examples per objective per epoch cannot fill one batch of "
                             f"{self.per_objective} per objective; lower --batch-size")

    def _gen(self, *key: int) -> torch.Generator:
        s = self.seed
        for k in key:
            s = (s * 1_000_003 + k + 1) % (2 ** 62)
        return torch.Generator().manual_seed(s)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()
            need = self.steps_per_epoch * self.per_objective
            orders = []
            for i, n in enumerate(self.sizes):
                g = self._gen(epoch, i)
                draws = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
                orders.append(torch.cat(draws)[:need].tolist())
            self._epoch_cache[epoch] = orders
        return self._epoch_cache[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """``[(objective, index within that objective), ...]`` of length ``batch_size``."""
        epoch, j = divmod(step, self.steps_per_epoch)
        orders = self._epoch(epoch)
        k = self.per_objective
        rows = [(i, orders[i][idx]) for i in range(len(self.sizes)) for idx in range(j * k, (j + 1) * k)]
        perm = torch.randperm(len(rows), generator=self._gen(epoch, len(self.sizes), j)).tolist()
        return [rows[p] for p in perm]


def shuffled_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Global batch ``step`` of a fresh shuffle of ``range(n)`` per epoch (the last partial batch of
    an epoch is dropped); a pure function of its arguments, so resuming needs only the step."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} examples cannot fill one batch of {batch_size}; lower --batch-size")
    epoch, j = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size].tolist()


def shard(rows: Sequence, rank: int, world_size: int) -> list:
    """This rank's equal share of a global batch (strided, so each rank sees mixed objectives)."""
    if len(rows) % world_size:
        raise ValueError(f"global batch of {len(rows)} rows does not split over {world_size} ranks")
    return list(rows[rank::world_size])


def micro_batches(rows: Sequence, size: int) -> list[list]:
    if size <= 0:
        raise ValueError(f"micro batch size must be positive, got {size}")
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]
