"""`GraphCache`: the one policy for the engine's captured CUDA graphs (the decode step, the promote
event): graphs by key, at most ``MAX_GRAPHS`` kept (least recently used evicted first), all
captured into one memory pool.

A graph holds the addresses of every tensor it touched, so an entry keeps alive what its replay
reads (``keep``), and a cache lives no longer than the buffers its graphs were captured on.
Only replaying work is cached: each user captures (with its own warm-up) and replays.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

import torch

# Graphs kept per cache (read at each capture). A call walks up at most log2(max_len / KV_BUCKET_MIN) + 1 kv buckets
# (8 for max_seq_len 4096) per slot bucket, and all graphs share one memory pool.
MAX_GRAPHS = 32


class GraphCache:
    def __init__(self) -> None:
        self._graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, tuple]] = OrderedDict()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._graphs))

    def get(self, key: Hashable) -> tuple[torch.cuda.CUDAGraph, tuple] | None:
        """``(graph, keep)`` captured under ``key`` (now the most recently used), or None."""
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
        return entry

    def capture(self, key: Hashable, record: Callable[[], None], keep: tuple[Any, ...] = ()
                ) -> torch.cuda.CUDAGraph:
        """Capture ``record()`` (recorded only: nothing runs) under ``key``, keeping ``keep``
        alive with it; evicts the least recently used graphs past ``MAX_GRAPHS``."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            record()
        self._graphs[key] = (graph, keep)
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph
