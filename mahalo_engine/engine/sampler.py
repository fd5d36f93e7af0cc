"""Sampling glue: static device buffers (per-slot head weights and temperatures, seed, offset)
around the kernels, and the owner of the heads' shared-weights plans.

Row n of a sampling call is slot n, so each slot draws from its own random stream
``(seed, offset, slot)``; the offset is a device tensor advanced in place after every draw, so
a replayed CUDA graph draws fresh numbers and a run is reproducible from its seed. The kernels
read the temperatures on the device too (0 = that slot greedy), and top-p/min-p likewise, so a
captured step serves every value: only ``top_k`` (the kernels' mode and tile shapes; 1 for a
greedy call) and whether top-p/min-p filter at all (``filtered``: they cost the kernels an extra
pass, so an unfiltered call does not pay for them) are part of a graph's key.

The sampler owns each slot's head weights and the plans derived from them: per row count, the
shared-weights plan (``triton_kernels.plan_heads``: U distinct weight vectors < H heads → U merged
heads) and the eager steps' ``SamplingPlan`` over it, in one table; the merged heads themselves
live in its ``MergeCache`` (``merge_budget_bytes``), by weight rows. The weights buffer is written
only when a slot's weights change (from the host, where they are known), so a plan is built once
per change, not per token. A plan is rebuilt when the heads were changed in place (their version
counter moved); ``invalidate()`` is the one hook to call after changing the heads any other way
(inference tensors, which carry no version, or a new heads tensor).
"""
from __future__ import annotations

import torch

from triton_kernels import HeadsPlan, MergeCache, SamplingPlan, multihead_sample, plan_heads
from triton_kernels.multihead.merge import DEFAULT_MERGE_BUDGET_BYTES


class Sampler:
    def __init__(self, heads: torch.Tensor, num_slots: int, *,
                 merge_budget_bytes: int = DEFAULT_MERGE_BUDGET_BYTES) -> None:
        self.heads = heads  # [H, V, d]
        dev = heads.device
        self.weights = torch.zeros(num_slots, heads.shape[0], dtype=torch.float32, device=dev)
        self.weights_host = torch.zeros(num_slots, heads.shape[0], dtype=torch.float32)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)
        self.temperature = torch.ones(num_slots, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=dev)
        self.min_p = torch.zeros(num_slots, dtype=torch.float32, device=dev)
        self.top_k = 0
        self.filtered = False  # top-p/min-p buffers passed to the kernels (else 1.0 / 0.0)
        self.merged = MergeCache(merge_budget_bytes)  # merged heads of self.heads, by weight rows
        # Per row count: the shared-weights plan and the eager steps' sampling plan over it (None
        # until an eager step needs it).
        self._plans: dict[int, tuple[HeadsPlan, SamplingPlan | None]] = {}
        self._epoch = 0  # bumped by invalidate(): merged-heads graphs key on it

    def configure(self, temperature: float, top_k: int, seed: int, top_p: float = 1.0,
                  min_p: float = 0.0) -> None:
        """Sampling options of one call (one value of each for every slot); restarts the random
        streams at (seed, offset 0)."""
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        self.min_p.fill_(min_p)
        self.filtered = temperature != 0 and (top_p < 1 or min_p > 0)
        # Greedy ignores top_k, and top_k = 1 selects the kernels' greedy mode at any temperature
        # (no noise, no top-k merge): a greedy call gets the cheapest step. Slots then stay greedy
        # whatever the buffer holds; after a sampling configure, writing 0 (or T > 0) into a
        # slot's entry makes it greedy (or sample at T) from the next draw on.
        self.top_k = 1 if temperature == 0 else int(top_k)
        self._plans = {n: (plan, None) for n, (plan, _) in self._plans.items()}
        self.seed.fill_(seed)
        self.offset.zero_()

    def set_weights(self, rows: torch.Tensor) -> None:
        """Head weights of every slot, ``rows`` float32 ``[S, H]`` on the host (normalised by
        ``Policy.weight_matrix``); copied to the device only if they changed."""
        if not torch.equal(rows, self.weights_host):
            self.weights_host.copy_(rows)
            self.weights.copy_(rows)
            self._plans.clear()  # a plan binds the weights' values (its merge)

    def set_slot_weights(self, rows: dict[int, torch.Tensor]) -> None:
        """`set_weights` from the rows of the used slots: unused slots repeat a used slot's
        weights, so that padding never adds a distinct weight vector (which would defeat the
        shared-weights fast path)."""
        full = next(iter(rows.values())).expand(self.weights_host.shape[0], -1).clone()
        for slot, w in rows.items():
            full[slot] = w
        self.set_weights(full)

    def invalidate(self, heads: torch.Tensor | None = None) -> None:
        """The heads changed: in place (needed only for inference tensors — a normal tensor's
        in-place update is seen by its version counter), or replaced by ``heads`` (same shape,
        dtype and device). Drops every plan and merged head; the next step plans again, and the
        decode runner's merged-heads graphs miss (their key holds the epoch)."""
        if heads is not None:
            old = self.heads
            if (heads.shape, heads.dtype, heads.device) != (old.shape, old.dtype, old.device):
                raise ValueError(f"new heads must match the old ones: {tuple(old.shape)} "
                                 f"{old.dtype} on {old.device}, got {tuple(heads.shape)} "
                                 f"{heads.dtype} on {heads.device}")
            self.heads = heads
        self.merged.clear()
        self._plans.clear()
        self._epoch += 1

    def plan(self, n: int) -> HeadsPlan:
        """The shared-weights plan of rows ``[0, n)``: built once per change of the weights or
        the heads."""
        entry = self._plans.get(n)
        if entry is None or not entry[0].is_current():
            entry = self._plans[n] = (plan_heads(self.heads, self.weights[:n], cache=self.merged,
                                                 host_weights=self.weights_host[:n]), None)
        return entry[0]

    def graph_operands(self, n: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``(heads, weights, key)`` to capture for rows ``[0, n)``: a merged plan's heads and
        one-hot weights when the rows share fewer weight vectors than there are heads, else the
        heads and the live weights buffer (a graph then reads whatever they hold). ``key``: the
        plan's key (merged: every row's weights and the heads' storage and version; general: the
        heads' storage) and the epoch — a graph is valid only while they stay the same."""
        plan = self.plan(n)
        weights = plan.weights if plan.merged else self.weights[:n]
        return plan.heads, weights, plan.key() + (self._epoch, self.filtered)

    def _filters(self, n: int) -> dict:
        """top_p/min_p of rows ``[0, n)``: the device buffers when a filter is on, else numbers
        that select the kernels' unfiltered modes."""
        if not self.filtered:
            return dict(top_p=1.0, min_p=0.0)
        return dict(top_p=self.top_p[:n], min_p=self.min_p[:n])

    def sample(self, hidden: torch.Tensor, heads: torch.Tensor | None = None,
               weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probs for rows ``[0, N)`` of ``hidden [N, d]``; advances the offset.
        ``heads``/``weights``: the operands of `graph_operands` (graph capture), else the plan."""
        n = hidden.shape[0]
        if heads is None and weights is None:
            plan = self.plan(n)
            sampling = self._plans[n][1]
            if sampling is None:
                sampling = SamplingPlan(self.heads, self.weights[:n],
                                        temperature=self.temperature[:n], top_k=self.top_k,
                                        seed=self.seed, offset=self.offset, plan=plan,
                                        **self._filters(n))
                self._plans[n] = (plan, sampling)
            out = sampling(hidden)
        else:
            out = multihead_sample(hidden, self.heads if heads is None else heads,
                                   self.weights[:n] if weights is None else weights,
                                   temperature=self.temperature[:n], top_k=self.top_k,
                                   seed=self.seed, offset=self.offset, **self._filters(n))
        self.offset.add_(1)
        return out
