"""Merging heads: ``merged[u] = Σ_i rows[u,i]·heads[i]``, and the owner-held cache of merged heads.

When the B rows of ``weights [B,H]`` hold only U < H distinct vectors, ``(heads [H,V,d], weights)``
may be replaced by ``(merged [U,V,d], one_hot [B,U])`` (the decision and the bookkeeping are the
plan's: ``triton_kernels.multihead.heads_plan``), so a step reads U heads instead of H.

When merging is exact (see ``docs/design.md``, "When pre-merging heads is exact"):
the mixture is linear in logits and every head reads the same hidden state, so
``Σ_i w_i (W_i h) = (Σ_i w_i W_i) h`` and the one-hot row weights (1·z_u + 0·z_other) add nothing.
Numerically, ``merged`` is accumulated in fp32 and rounded once to the heads' dtype: with fp32
heads it matches the general path to fp32 rounding; with bf16/fp16 heads the merged weights carry
one rounding (relative 2**-9 / 2**-12 per element), i.e. the two paths agree to that tolerance, not
bit for bit. It does not apply to per-head outputs (per-head log-probs, probability mixtures) and
not to training (per-head gradients).

Merging (on CUDA one Triton pass, ``triton_kernels.multihead.merge_kernel``) reads the H heads once and
writes U merged ones, H + U head transfers, against H - U saved per step: it pays after about
(H + U)/(H - U) steps with the same weight vectors (2 for H = 3, U = 1). (The chunked torch merge,
the CPU path, moves ~8× more bytes.) So merged heads are kept by whoever holds the heads (the
engine's ``Sampler``) in a ``MergeCache`` with an explicit byte budget; nothing here is global.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import NamedTuple

import torch

from triton_kernels.argcheck import check_int
from triton_kernels.multihead.merge_kernel import MAX_MERGE_HEADS, merge_heads_triton

log = logging.getLogger(__name__)

_MERGE_CHUNK_BYTES = 64 << 20  # fp32 scratch per merge step: never a whole fp32 head
# Default budget of a MergeCache (the engine's sampler's): room for 7 merged bf16 heads of a
# Qwen2.5-0.5B-sized vocabulary (151936 x 896, 272 MB each).
DEFAULT_MERGE_BUDGET_BYTES = 2 << 30


def tensor_version(t: torch.Tensor) -> int | None:
    """The in-place version counter of ``t`` (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


class HeadsKey(NamedTuple):
    """What identifies the *values* of a heads tensor without reading them: its storage, version
    counter (bumped by every in-place write), shape, dtype and device."""

    data_ptr: int
    version: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(heads: torch.Tensor) -> "HeadsKey":
        return HeadsKey(heads.data_ptr(), tensor_version(heads), tuple(heads.shape), heads.dtype,
                        heads.device)


def row_key(rows: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    """Hashable form of host weight rows ``[U,H]``."""
    return tuple(tuple(r) for r in rows.tolist())


class MergeCache:
    """LRU of merged heads ``[U,V,d]`` for one owner's heads, keyed by the distinct weight rows and
    bounded by ``max_bytes`` (0 = never merge).

    It keeps no reference to the heads: each ``get`` compares the heads' ``HeadsKey`` with the one
    its entries were merged from and drops them all on a change, so an in-place update of the
    heads (``heads.copy_``) is never served stale. Inference tensors carry no version counter: after
    changing such heads in place, the owner calls ``clear()``.
    """

    def __init__(self, max_bytes: int) -> None:
        check_int("max_bytes", max_bytes, 0)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._heads_key: HeadsKey | None = None
        self.nbytes = 0
        self.merges = 0  # merges computed (cache misses), for tests and benchmarks
        self._warned: set[tuple[int, int]] = set()

    def clear(self) -> None:
        self._entries.clear()
        self._heads_key = None
        self.nbytes = 0

    def get(self, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Merged heads for the distinct host weight ``rows [U,H]``; None if they cannot fit in
        ``max_bytes`` (the caller then runs the general path)."""
        H, V, d = heads.shape
        need = rows.shape[0] * V * d * heads.element_size()
        if need > self.max_bytes:
            if self.max_bytes > 0 and (need, self.max_bytes) not in self._warned:
                self._warned.add((need, self.max_bytes))
                log.warning("shared-weights fast path skipped: %d merged heads need %d bytes, over "
                            "the merge cache budget of %d bytes; running the general %d-head path",
                            rows.shape[0], need, self.max_bytes, H)
            return None
        hkey = HeadsKey.of(heads)
        if hkey != self._heads_key:  # other heads, or these changed in place: all entries stale
            self.clear()
            self._heads_key = hkey
        key = row_key(rows)
        merged = self._entries.get(key)
        if merged is not None:
            self._entries.move_to_end(key)
            return merged
        while self._entries and self.nbytes + need > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        merged = merge_heads(heads, rows)
        self.merges += 1
        self._entries[key] = merged
        self.nbytes += need
        return merged


def merge_heads(heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[U,V,d]`` in the heads' dtype: ``Σ_i rows[u,i]·heads[i]``, fp32 accumulation. CUDA (and
    the interpreter, ``TRITON_INTERPRET=1``): one Triton pass reading each head once
    (``triton_kernels.multihead.merge_kernel``); CPU: the chunked torch merge."""
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
