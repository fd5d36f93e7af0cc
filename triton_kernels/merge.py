"""Shared-weights fast path: merge heads once per distinct weight vector, with a bounded cache.

When the B rows of ``weights [B,H]`` hold only U < H distinct vectors, the launcher replaces
``(heads [H,V,d], weights)`` by ``(merged [U,V,d], one_hot [B,U])`` with ``merged[u] = Σ_i r_ui·W_i``
(``r_u`` the u-th distinct row), so a step reads U heads instead of H.

When merging is exact (see ``docs/design.md``, "When pre-merging heads is exact"):
the mixture is linear in logits and every head reads the same hidden state, so
``Σ_i w_i (W_i h) = (Σ_i w_i W_i) h`` and the one-hot row weights (1·z_u + 0·z_other) add nothing.
Numerically, ``merged`` is accumulated in fp32 and rounded once to the heads' dtype: with fp32
heads it matches the general path to fp32 rounding; with bf16/fp16 heads the merged weights carry
one rounding (relative 2**-9 / 2**-12 per element), i.e. the two paths agree to that tolerance, not
bit for bit. It does not apply to per-head outputs (per-head log-probs, probability mixtures) and
not to training (per-head gradients).

Merging (on CUDA one Triton pass, ``triton_kernels.merge_kernel``) reads the H heads once and
writes U merged ones, H + U head transfers, against H - U saved per step: it pays after about
(H + U)/(H - U) steps with the same weight vectors (2 for H = 3, U = 1), and the cache keeps it
across steps. (The chunked torch merge, the CPU path, moves ~8× more bytes.) Cache: LRU over merged tensors, bounded by
``MergeCache.max_bytes`` (``MAHALO_MERGE_CACHE_BYTES``, default 2 GiB; 0 disables the fast path).
Keys: the heads tensor's identity (a weak reference, ``data_ptr``, ``_version``) and the distinct
weight rows, so an in-place update of the heads (``heads.copy_``) invalidates its entries. Inference
tensors carry no version counter: after changing such heads in place, call ``merge_cache.clear()``.

Finding U needs the weights on the host (one small device-to-host copy, which also checks them for
non-finite values). The resulting plan is remembered per weights tensor (identity + ``_version``),
so a decode loop that passes the same, unchanged weights tensor does no host read after the first
step. Under CUDA-graph capture nothing can be read: the launcher runs the general path on the
tensors given; call ``merge_shared_heads`` before capture and capture with its outputs instead.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from triton_kernels.checks import check_finite_weights, check_mixture
from triton_kernels.merge_kernel import MAX_MERGE_HEADS, merge_heads_triton

log = logging.getLogger(__name__)

_MERGE_CHUNK_BYTES = 64 << 20  # fp32 scratch per merge step: never a whole fp32 head
_MAX_PLANS = 16


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class _HeadsKey(NamedTuple):
    ident: int
    data_ptr: int
    version: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(heads: torch.Tensor) -> "_HeadsKey":
        return _HeadsKey(id(heads), heads.data_ptr(), _version(heads), tuple(heads.shape),
                         heads.dtype, heads.device)


class MergeCache:
    """LRU of merged heads ``[U,V,d]`` keyed by (heads identity, distinct weight rows)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[weakref.ref, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.merges = 0  # merges computed (cache misses), for tests and benchmarks
        self._warned: set[tuple[int, int]] = set()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop(self, key: tuple) -> None:
        _, merged = self._entries.pop(key)
        self.nbytes -= merged.numel() * merged.element_size()

    def _purge_stale(self, heads: torch.Tensor, hkey: _HeadsKey) -> None:
        for key, (ref, _) in list(self._entries.items()):
            alive = ref()
            if alive is None or (alive is heads and key[0] != hkey):
                self._drop(key)

    def get(self, heads: torch.Tensor, rows: tuple[tuple[float, ...], ...]) -> torch.Tensor | None:
        """Merged heads for these distinct weight rows; None if they cannot fit in ``max_bytes``."""
        H, V, d = heads.shape
        need = len(rows) * V * d * heads.element_size()
        if need > self.max_bytes:
            if self.max_bytes > 0 and (need, self.max_bytes) not in self._warned:
                self._warned.add((need, self.max_bytes))
                log.warning("shared-weights fast path skipped: %d merged heads need %d bytes, over "
                            "the merge cache budget of %d bytes (MAHALO_MERGE_CACHE_BYTES); running "
                            "the general %d-head path", len(rows), need, self.max_bytes, H)
            return None
        hkey = _HeadsKey.of(heads)
        self._purge_stale(heads, hkey)
        key = (hkey, rows)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is heads:
            self._entries.move_to_end(key)
            return entry[1]
        while self._entries and self.nbytes + need > self.max_bytes:
            self._drop(next(iter(self._entries)))
        merged = merge_heads(heads, torch.tensor(rows, dtype=torch.float32))
        self.merges += 1
        self._entries[key] = (weakref.ref(heads), merged)
        self.nbytes += need
        return merged


merge_cache = MergeCache(int(os.environ.get("MAHALO_MERGE_CACHE_BYTES", 2 << 30)))


def merge_heads(heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[U,V,d]`` in the heads' dtype: ``Σ_i rows[u,i]·heads[i]``, fp32 accumulation. CUDA (and
    the interpreter, ``TRITON_INTERPRET=1``): one Triton pass reading each head once
    (``triton_kernels.merge_kernel``); CPU: the chunked torch merge."""
    contiguous_heads = heads.stride(2) == 1 and heads.stride(1) == heads.shape[2]
    use_triton = heads.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if use_triton and contiguous_heads and heads.shape[0] <= MAX_MERGE_HEADS:
        return merge_heads_triton(heads, rows)
    if heads.is_cuda:
        log.warning("merging %d heads of strides %s with the chunked torch merge (the Triton merge "
                    "needs contiguous heads, at most %d)", heads.shape[0], heads.stride(),
                    MAX_MERGE_HEADS)
    return merge_heads_torch(heads, rows)


def merge_heads_torch(heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The readable merge (and the CPU path): V-chunked fp32 accumulation, one cast at the end."""
    H, V, d = heads.shape
    merged = torch.empty(rows.shape[0], V, d, dtype=heads.dtype, device=heads.device)
    chunk = max(1, _MERGE_CHUNK_BYTES // (4 * d))
    with torch.no_grad():
        for u, row in enumerate(rows.tolist()):
            for v0 in range(0, V, chunk):
                acc = torch.zeros(min(chunk, V - v0), d, dtype=torch.float32, device=heads.device)
                for i, w in enumerate(row):
                    if w != 0.0:  # 0·W = 0 exactly for finite W: skipping it reads less
                        acc.add_(heads[i, v0:v0 + chunk].float(), alpha=w)
                merged[u, v0:v0 + chunk] = acc
    return merged


class _Plan(NamedTuple):
    weights_ref: weakref.ref
    weights_version: int | None
    heads_key: _HeadsKey
    weights_fp32: torch.Tensor  # [B, H]: the general path's weights
    rows: tuple[tuple[float, ...], ...] | None  # distinct weight rows when U < H, else None
    one_hot: torch.Tensor | None  # fp32 [B, U]: row b takes merged head inverse[b]


_plans: OrderedDict[int, _Plan] = OrderedDict()


def _make_plan(heads: torch.Tensor, weights: torch.Tensor) -> _Plan:
    host = weights.detach().to("cpu", torch.float32)
    check_finite_weights(host)
    weights_fp32 = weights.detach().to(torch.float32).contiguous()
    distinct, inverse = torch.unique(host, dim=0, return_inverse=True)
    rows = one_hot = None
    if distinct.shape[0] < heads.shape[0]:
        rows = tuple(tuple(r) for r in distinct.tolist())
        one_hot = torch.nn.functional.one_hot(inverse, len(rows)).to(weights.device, torch.float32)
    return _Plan(weakref.ref(weights), _version(weights), _HeadsKey.of(heads), weights_fp32, rows,
                 one_hot)


def plan_heads(heads: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher's view of ``(heads, weights)``: merged heads + one-hot weights when the rows
    share U < H weight vectors (and the merge fits the cache), else the heads and fp32 weights.
    Rejects non-finite weights, except under CUDA-graph capture, where no host read is possible."""
    if weights.is_cuda and torch.cuda.is_current_stream_capturing():
        return heads, weights.detach().to(torch.float32).contiguous()
    plan = _plans.get(id(weights))
    fresh = (plan is not None and plan.weights_ref() is weights
             and plan.weights_version is not None and plan.weights_version == _version(weights)
             and plan.heads_key == _HeadsKey.of(heads))
    if fresh:
        _plans.move_to_end(id(weights))
    else:
        plan = _make_plan(heads, weights)
        if plan.weights_version is not None:  # inference tensors: no version, so no plan reuse
            _plans[id(weights)] = plan
            while len(_plans) > _MAX_PLANS:
                _plans.popitem(last=False)
    if plan.rows is not None:
        merged = merge_cache.get(heads, plan.rows)
        if merged is not None:
            return merged, plan.one_hot
    return heads, plan.weights_fp32


def merge_shared_heads(heads: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Public form of the fast path for CUDA-graph capture: returns ``(heads_eff, weights_eff)`` to
    pass to ``multihead_logits``/``multihead_sample`` in place of ``(heads, weights)``. Call it
    outside capture and keep both tensors alive for as long as the graph is replayed."""
    check_mixture(heads, weights)
    return plan_heads(heads, weights)
