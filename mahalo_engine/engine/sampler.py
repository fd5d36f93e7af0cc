"""Sampling glue: static device buffers (per-slot head weights and temperatures, seed, offset)
around ``triton_kernels.multihead_sample``.

Row n of a sampling call is slot n, so each slot draws from its own random stream
``(seed, offset, slot)``; the offset is a device tensor advanced in place after every draw, so
a replayed CUDA graph draws fresh numbers and a run is reproducible from its seed. The kernels
read the temperatures on the device too (0 = that slot greedy), so a captured step serves every
temperature: only ``top_k`` (the kernels' mode and tile shapes; 1 for a greedy call) is part of
a graph's key.
The weights buffer is written only when a slot's weights change (from the host, where they are
known), so the launcher's shared-weights plan — U distinct weight vectors < H heads → U merged
heads — is computed once per change, not per token.
"""
from __future__ import annotations

import torch

from triton_kernels import SamplingPlan, merge_shared_heads, multihead_sample


class Sampler:
    def __init__(self, heads: torch.Tensor, num_slots: int) -> None:
        self.heads = heads  # [H, V, d]
        dev = heads.device
        self.weights = torch.zeros(num_slots, heads.shape[0], dtype=torch.float32, device=dev)
        self.weights_host = torch.zeros(num_slots, heads.shape[0], dtype=torch.float32)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)
        self.temperature = torch.ones(num_slots, dtype=torch.float32, device=dev)
        self.top_k = 0
        # One persistent view per row count: the launcher remembers its plan per weights tensor.
        self._views: dict[int, torch.Tensor] = {}
        self._plans: dict[int, SamplingPlan] = {}  # eager steps, per row count

    def configure(self, temperature: float, top_k: int, seed: int) -> None:
        """Sampling options of one call (one temperature for every slot); restarts the random
        streams at (seed, offset 0)."""
        self.temperature.fill_(temperature)
        # Greedy ignores top_k, and top_k = 1 selects the kernels' greedy mode at any temperature
        # (no noise, no top-k merge): a greedy call gets the cheapest step. Slots then stay greedy
        # whatever the buffer holds; after a sampling configure, writing 0 (or T > 0) into a
        # slot's entry makes it greedy (or sample at T) from the next draw on.
        self.top_k = 1 if temperature == 0 else int(top_k)
        self._plans.clear()
        self.seed.fill_(seed)
        self.offset.zero_()

    def set_weights(self, rows: torch.Tensor) -> None:
        """Head weights of every slot, ``rows`` float32 ``[S, H]`` on the host (normalised by
        ``Policy.weight_matrix``); copied to the device only if they changed."""
        if not torch.equal(rows, self.weights_host):
            self.weights_host.copy_(rows)
            self.weights.copy_(rows)
            self._plans.clear()  # a plan binds the weights' values (its merge)

    def view(self, n: int) -> torch.Tensor:
        if n not in self._views:
            self._views[n] = self.weights[:n]
        return self._views[n]

    def graph_operands(self, n: int) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """``(heads, weights, key)`` to capture for rows ``[0, n)``: the merged heads and their
        one-hot weights when the rows share fewer weight vectors than there are heads (then
        ``key`` = every row's weights, and a graph is valid only while they stay), else the heads
        and the live weights buffer (``key`` None: the graph reads whatever the buffer holds)."""
        rows = self.weights_host[:n]
        distinct = torch.unique(rows, dim=0)
        if distinct.shape[0] >= self.heads.shape[0]:
            return self.heads, self.view(n), None
        heads, weights = merge_shared_heads(self.heads, self.view(n))
        if heads is self.heads:  # the merge did not fit the launcher's cache: general path
            return heads, self.view(n), None
        return heads, weights, tuple(tuple(r) for r in rows.tolist())

    def sample(self, hidden: torch.Tensor, heads: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probs for rows ``[0, N)`` of ``hidden [N, d]``; advances the offset."""
        n = hidden.shape[0]
        if heads is None and weights is None:
            plan = self._plans.get(n)
            if plan is None:
                plan = self._plans[n] = SamplingPlan(
                    self.heads, self.view(n), temperature=self.temperature[:n], top_k=self.top_k,
                    seed=self.seed, offset=self.offset)
            out = plan(hidden)
        else:  # graph capture: the operands of `graph_operands`
            out = multihead_sample(hidden, self.heads if heads is None else heads,
                                   self.view(n) if weights is None else weights,
                                   temperature=self.temperature[:n], top_k=self.top_k,
                                   seed=self.seed, offset=self.offset)
        self.offset.add_(1)
        return out
