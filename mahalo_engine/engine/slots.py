"""The owner of step search's candidate slots: the group → slot arithmetic and every slot event.

Group g (one running request) owns candidate slots ``g*K .. g*K+K-1``, in the policy's cache, in
the decode runner's per-slot state and in every scorer's cache. Each event is applied here to all
of them at once:

- ``admit``: prefill new requests' prompts; every candidate slot starts from the prompt;
- ``begin_step``: candidate slots start a new step from the committed text;
- ``promote``: each continuing group's winner becomes the group's committed text;
- ``move``: compaction hands a live group's committed text to a lower, free group.

Two layouts of the policy cache (``Engine(cache_layout=...)``): `ForkSlots` keeps a full copy of
the committed text in each of the K slots (``kv_fork`` / ``kv_promote``); `SharedPrefixSlots`
keeps it once per group in a `SharedPrefixCache` and only the step's tokens per candidate (cascade
attention reads the prefix once per group). Scorers get the same candidate-slot events in both;
a scorer with a cache may lay it out like the policy's (`scorers.SlotLayout`, given at prepare:
`ValueModelPRM` does).
"""
from __future__ import annotations

from typing import Any

import torch

from mahalo_engine.cache import KVCache
from mahalo_engine.engine.graph_runner import DecodeRunner
from mahalo_engine.engine.scorers import Scorer
from mahalo_engine.text import Prompt
from mahalo_engine.ops import kv_fork, kv_promote
from mahalo_engine.shared_cache import SharedPrefixCache

CACHE_LAYOUTS = ("fork", "shared_prefix")


class Slots:
    """Shared part of both layouts: slot arithmetic and the runner/scorer side of each event."""

    def __init__(self, model: Any, cache: Any, runner: DecodeRunner, k: int,
                 scorer: Scorer | None) -> None:
        self.model, self.cache, self.runner, self.k, self.scorer = model, cache, runner, k, scorer
        self.device = cache.device

    def slots(self, groups: list[int]) -> torch.Tensor:
        """``[len(groups), K]`` candidate slots (on the host)."""
        return torch.tensor(groups, dtype=torch.long)[:, None] * self.k + torch.arange(self.k)

    def admit(self, groups: list[int], prompts: list[Prompt]) -> None:
        slots = self.slots(groups).to(self.device)
        self._admit_cache(slots, [p.ids for p in prompts])
        if self.scorer is not None:
            self.scorer.start(slots, prompts)

    def begin_step(self, flat: torch.Tensor, caps: torch.Tensor) -> None:
        self.runner.begin(flat, caps)

    def promote(self, winners: list[int], groups: list[int], start: list[int]) -> None:
        """``winners``: each continuing group's winning candidate slot; ``start``: the group's
        committed length before the step."""
        w = torch.tensor(winners, device=self.device)
        slots = self.slots(groups).to(self.device)
        self._promote_cache(w, slots, torch.tensor(start, device=self.device))
        self.runner.copy_hidden(w.repeat_interleave(self.k), slots.reshape(-1))
        if self.scorer is not None and self.k > 1:
            self.scorer.promote(w, slots)

    def move(self, moves: list[tuple[int, int]]) -> None:
        """``(from group, to group)`` pairs; between steps."""
        src = self.slots([h for h, _ in moves])[:, :1].expand(-1, self.k).reshape(-1)
        dst = self.slots([f for _, f in moves]).reshape(-1)
        src, dst = src.to(self.device), dst.to(self.device)
        self._move_cache(moves, src, dst)
        self.runner.copy_hidden(src, dst)
        if self.scorer is not None:
            self.scorer.move(src, dst)

    # -- the policy cache's side, per layout ------------------------------------------------------

    def _admit_cache(self, slots: torch.Tensor, ids: list[list[int]]) -> None:
        raise NotImplementedError

    def _promote_cache(self, winners: torch.Tensor, slots: torch.Tensor,
                       start: torch.Tensor) -> None:
        raise NotImplementedError

    def _move_cache(self, moves: list[tuple[int, int]], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        raise NotImplementedError


class ForkSlots(Slots):
    """Every candidate slot of a `KVCache` holds its own copy of the committed text."""

    def _admit_cache(self, slots: torch.Tensor, ids: list[list[int]]) -> None:
        first = slots[:, 0]
        self.runner.set_hidden(first, self.model.prefill(self.cache, ids, first))
        if self.k > 1:
            src = first.repeat_interleave(self.k - 1)
            dst = slots[:, 1:].reshape(-1)
            kv_fork(self.cache.data, self.cache.lens, src, dst)
            self.runner.copy_hidden(src, dst)

    def _promote_cache(self, winners: torch.Tensor, slots: torch.Tensor,
                       start: torch.Tensor) -> None:
        if self.k > 1:  # with one candidate the slot already is its own winner
            kv_promote(self.cache.data, self.cache.lens, winners, slots, start)

    def _move_cache(self, moves: list[tuple[int, int]], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        kv_fork(self.cache.data, self.cache.lens, src, dst)


class SharedPrefixSlots(Slots):
    """One prefix slot per group and K short candidate slots (`SharedPrefixCache`)."""

    cache: SharedPrefixCache

    def _admit_cache(self, slots: torch.Tensor, ids: list[list[int]]) -> None:
        groups = slots[:, 0] // self.k
        hidden = self.model.prefill(self.cache.prefix, ids, groups)
        self.runner.set_hidden(slots.reshape(-1), hidden.repeat_interleave(self.k, dim=0))

    def begin_step(self, flat: torch.Tensor, caps: torch.Tensor) -> None:
        self.cache.begin_step(flat)
        super().begin_step(flat, caps)

    def _promote_cache(self, winners: torch.Tensor, slots: torch.Tensor,
                       start: torch.Tensor) -> None:
        self.cache.commit(winners, slots[:, 0] // self.k)

    def _move_cache(self, moves: list[tuple[int, int]], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        self.cache.move(torch.tensor([h for h, _ in moves], device=self.device),
                        torch.tensor([f for _, f in moves], device=self.device))


def allocate(layout: str, config: Any, num_groups: int, k: int, max_len: int, step_len: int, *,
             dtype: torch.dtype, device: torch.device) -> KVCache | SharedPrefixCache:
    """The policy cache of ``layout`` for ``num_groups`` groups of ``k`` candidates."""
    if layout == "shared_prefix":
        return SharedPrefixCache.allocate(config, num_groups, k, max_len, step_len, dtype=dtype,
                                          device=device)
    return KVCache.allocate(config, num_groups * k, max_len, dtype=dtype, device=device)


def nbytes(layout: str, config: Any, num_groups: int, k: int, max_len: int, step_len: int,
           dtype: torch.dtype) -> int:
    """Bytes `allocate` would take: ``G·(max_len + K·step_len)`` positions for shared_prefix,
    ``G·K·max_len`` for fork."""
    if layout == "shared_prefix":
        return SharedPrefixCache.nbytes(config, num_groups, k, max_len, step_len, dtype)
    return KVCache.nbytes(config, num_groups * k, max_len, dtype)


def owner(layout: str, model: Any, cache: Any, runner: DecodeRunner, k: int,
          scorer: Scorer | None) -> Slots:
    cls = SharedPrefixSlots if layout == "shared_prefix" else ForkSlots
    return cls(model, cache, runner, k, scorer)
