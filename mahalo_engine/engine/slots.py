"""The owner of step search's candidate slots: the group → slot arithmetic and every slot event.

Group g (one running request) owns candidate slots ``g*K .. g*K+K-1``, in the policy's cache, in
the decode runner's per-slot state and in every scorer's cache. Each event is applied here to all
of them at once:

- ``admit``: prefill new requests' prompts; every candidate slot starts from the prompt;
- ``begin_step``: candidate slots start a new step from the committed text;
- ``promote``: each continuing group's winner becomes the group's committed text;
- ``move``: compaction hands a live group's committed text to a lower, free group.

A promote is one call per step for all continuing groups: one host-to-device copy of its
indices, one copy launch for the policy cache and one per scorer cache (`KVCache.promote`), the
runner's hidden states vectorised; on CUDA it replays a CUDA graph per group count (`EventGraphs`).

Two layouts of the policy cache (``Engine(cache_layout=...)``): `ForkSlots` keeps a full copy of
the committed text in each of the K slots (`KVCache.fork` / `KVCache.promote`); `SharedPrefixSlots`
keeps it once per group in a `SharedPrefixCache` and only the step's tokens per candidate (cascade
attention reads the prefix once per group). Scorers get the same candidate-slot events in both;
a scorer with a cache may lay it out like the policy's (`scorers.SlotLayout`, given at prepare:
`ValueModelPRM` does).
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

import torch

from mahalo_engine.cache import KVCache
from mahalo_engine.engine.decode_runner import DecodeRunner
from mahalo_engine.engine.scorers import Scorer
from mahalo_engine.text import Prompt
from mahalo_engine.shared_cache import SharedPrefixCache

CACHE_LAYOUTS = ("fork", "shared_prefix")
T = TypeVar("T")


class EventGraphs:
    """Runs a slot event on its index tensor copied to the device (one host-to-device copy):
    eagerly, or on CUDA (``enabled``) from a CUDA graph keyed by the event and its shape, captured
    on the shape's second use (a shape seen once is not worth a capture; its first, eager run is
    the warm-up) and replayed after copying the new indices into the graph's input buffer.

    A graph holds the addresses of every tensor the event touched: it is valid while those
    tensors live, so an owner lives no longer than the caches, runner and scorer it serves."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self._seen: set[Hashable] = set()
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def run(self, key: Hashable, host: torch.Tensor,
            apply: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """``apply(index on the device)``; returns that device index (valid until the next run)."""
        key = (key, tuple(host.shape), host.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            if not self.enabled or key not in self._seen:
                self._seen.add(key)
                index = host.to(self.device)
                apply(index)
                return index
            static = host.to(self.device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):  # records only: nothing runs yet
                apply(static)
            entry = self._graphs[key] = (graph, static)
        graph, static = entry
        static.copy_(host, non_blocking=True)
        graph.replay()
        return static


class Slots:
    """Shared part of both layouts: slot arithmetic and the runner/scorer side of each event."""

    def __init__(self, model: Any, cache: Any, runner: DecodeRunner, k: int,
                 scorer: Scorer | None) -> None:
        self.model, self.cache, self.runner, self.k, self.scorer = model, cache, runner, k, scorer
        self.device = cache.device
        self.graphs = EventGraphs(self.device, runner.use_graphs)
        # The scorer's part of an event joins the graph only if it is graph-safe.
        self._scorer_in_graph = scorer is not None and scorer.graph_safe()

    def slots(self, groups: list[int]) -> torch.Tensor:
        """``[len(groups), K]`` candidate slots (on the host)."""
        return torch.tensor(groups, dtype=torch.long)[:, None] * self.k + torch.arange(self.k)

    def span(self, groups: list[int]) -> int:
        """Slots ``[0, span)`` hold every candidate slot of ``groups``."""
        return (max(groups) + 1) * self.k

    def per_slot(self, by_group: dict[int, T]) -> dict[int, T]:
        """A value per group spread to each of its K candidate slots."""
        return {g * self.k + j: v for g, v in by_group.items() for j in range(self.k)}

    def admit(self, groups: list[int], prompts: list[Prompt]) -> None:
        slots = self.slots(groups).to(self.device)
        self._admit_cache(slots, [p.ids for p in prompts])
        if self.scorer is not None:
            self.scorer.start(slots, prompts)

    def begin_step(self, flat: torch.Tensor, caps: torch.Tensor) -> None:
        self.runner.begin(flat, caps)

    def promote(self, winners: list[int], groups: list[int], start: list[int]) -> None:
        """``winners``: each continuing group's winning candidate slot; ``start``: the group's
        committed length before the step. One host-to-device copy of every index, then (one CUDA
        graph on CUDA) one copy launch for the policy cache and one per scorer cache, the
        runner's hidden states in one gather/scatter."""
        g, k = len(groups), self.k
        slots = self.slots(groups)
        w = torch.tensor(winners, dtype=torch.long)
        losers = slots[slots != w[:, None]]  # on the host: [G*(K-1)], group by group
        if losers.numel() != g * (k - 1):
            raise ValueError(f"winners {winners} must be one candidate slot of each group {groups}")
        host = torch.cat((w.repeat_interleave(k - 1), losers,
                          torch.tensor(start, dtype=torch.long).repeat_interleave(k - 1), w,
                          slots.reshape(-1)))
        p = g * (k - 1)

        def apply(index: torch.Tensor) -> None:
            src, dst, first = index[:p], index[p:2 * p], index[2 * p:3 * p]
            self._promote_cache(src, dst, first, index[3 * p:3 * p + g],
                                index[3 * p + g:].view(g, k))
            if p:
                self.runner.copy_hidden(src, dst)
            if g and self._scorer_in_graph:  # K = 1: no pairs, but a scorer may commit per group
                self.scorer.promote(src, dst, index[3 * p:3 * p + g],
                                    index[3 * p + g:].view(g, k))

        index = self.graphs.run("promote", host, apply)
        if g and self.scorer is not None and not self._scorer_in_graph:
            self.scorer.promote(index[:p], index[p:2 * p], index[3 * p:3 * p + g],
                                index[3 * p + g:].view(g, k))

    def move(self, moves: list[tuple[int, int]]) -> None:
        """``(from group, to group)`` pairs; between steps."""
        src = self.slots([h for h, _ in moves])[:, :1].expand(-1, self.k).reshape(-1)
        dst = self.slots([f for _, f in moves]).reshape(-1)
        index = torch.stack((src, dst)).to(self.device)
        src, dst = index[0], index[1]
        self._move_cache(moves, src, dst)
        self.runner.copy_hidden(src, dst)
        if self.scorer is not None:
            self.scorer.move(src, dst)

    # -- the policy cache's side, per layout ------------------------------------------------------

    def _admit_cache(self, slots: torch.Tensor, ids: list[list[int]]) -> None:
        raise NotImplementedError

    def _promote_cache(self, src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor,
                       winners: torch.Tensor, slots: torch.Tensor) -> None:
        """Non-winning slot ``dst[p]`` takes winner ``src[p]``'s step after ``start[p]``;
        equivalently group ``slots[i]`` commits ``winners[i]``."""
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
            self.cache.fork(src, dst)
            self.runner.copy_hidden(src, dst)

    def _promote_cache(self, src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor,
                       winners: torch.Tensor, slots: torch.Tensor) -> None:
        if len(src):  # with one candidate the slot already is its own winner
            self.cache.promote(src, dst, start)

    def _move_cache(self, moves: list[tuple[int, int]], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        self.cache.move(src, dst)


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

    def _promote_cache(self, src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor,
                       winners: torch.Tensor, slots: torch.Tensor) -> None:
        self.cache.commit(winners, slots[:, 0] // self.k)

    def _move_cache(self, moves: list[tuple[int, int]], src: torch.Tensor,
                    dst: torch.Tensor) -> None:
        groups = torch.tensor(moves, dtype=torch.long).to(self.device)
        self.cache.move(groups[:, 0], groups[:, 1])


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
