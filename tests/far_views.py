"""Tensors whose elements sit more than 2**31 elements apart, without the memory to match.

A kernel that forms ``i * stride`` in int32 reads the wrong address once the product passes 2**31,
which at real sizes means gigabytes of weights or cache. ``far_view`` places the view's elements
in an anonymous ``MAP_NORESERVE`` mapping: only the pages the test writes or the kernel reads are
ever committed, so a 4-8 GiB span costs a few MiB. The mapping starts ``guard_bytes`` before the
view's first element so that an int32-wrapped (negative) offset lands on mapped zero pages, and
the test fails on wrong values instead of a segfault (the Triton interpreter). On a GPU the span
is allocated for real (a few GiB).
"""
from __future__ import annotations

import math
import mmap

import torch

GUARD_BYTES = 2**32 + 2**20  # covers any int32 offset wrapped to negative, for 1- to 2-byte dtypes
# Python < 3.12 does not export it; the value is Linux's (x86-64 and arm64 alike).
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def far_view(shape: tuple[int, ...], strides: tuple[int, ...], dtype: torch.dtype, *,
             device: torch.device | str = "cpu", guard_bytes: int = GUARD_BYTES) -> torch.Tensor:
    """A zero-filled view ``[shape]`` at ``strides`` (elements). On CPU committed only where
    touched; on CUDA the whole span is allocated (the card's fault is the failure there)."""
    size = torch.empty((), dtype=dtype).element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    if torch.device(device).type != "cpu":
        return torch.zeros(span, dtype=dtype, device=device).as_strided(shape, strides)
    guard = math.ceil(guard_bytes / size) * size
    mapping = mmap.mmap(-1, guard + span * size,
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    flat = torch.frombuffer(mapping, dtype=dtype)  # keeps the mapping alive
    return flat.as_strided(shape, strides, guard // size)


def far_suffix(sk: torch.Tensor, sv: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of suffix caches ``sk/sv [R, K, n_kv, Ts, hd]`` with candidates ``stride`` elements
    apart (K and V of a candidate side by side, equal strides: views of one cache)."""
    r, k, n_kv, ts, hd = sk.shape
    block = n_kv * ts * hd
    kv = far_view((2, r, k, n_kv, ts, hd), (block, k * stride, stride, ts * hd, hd, 1), sk.dtype,
                  device=sk.device)
    kv[0].copy_(sk)
    kv[1].copy_(sv)
    return kv[0], kv[1]
