"""The Triton merge of shared-weight heads: ``merged[u] = Σ_i rows[u,i] · heads[i]`` in one pass.

Each program owns ``BLOCK`` consecutive elements of a head (a head ``[V,d]`` is one flat vector of
``V·d`` elements; heads may sit at any stride from each other), loads them from all H heads once
(H is a compile-time constant, so the H loads are issued together), accumulates the U merged
values in fp32 registers and writes them in the heads' dtype: ``(H + U)·V·d`` element transfers,
the floor: 8 bytes per bf16 element for H = 3, U = 1, against ~64 for the chunked torch merge
(per head an fp32 upcast and a scaled add into an fp32 scratch, then a cast and a copy).

Numerics: fp32 accumulation over i = 0..H-1 in order, one rounding to the heads' dtype at the end,
like the torch merge (``triton_kernels.multihead.merge.merge_heads_torch``); on a GPU the multiply-add may
be fused (one rounding fewer), so the two agree to fp32 rounding before the final cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_MERGE_HEADS = 16  # H is unrolled in the kernel: a sanity bound on the unrolling


@triton.jit
def _merge_kernel(heads_ptr, rows_ptr, out_ptr, N, U, stride_hh, stride_ou,
                  H: tl.constexpr, U_PAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    us = tl.arange(0, U_PAD)
    u_ok = us < U
    acc = tl.zeros((U_PAD, BLOCK), dtype=tl.float32)
    # int64: head i starts i·V·d elements in, past 2**31 from a 7B model's fifth head on, while
    # the stride itself fits int32 (so Triton passes it as i32 and i·stride would wrap).
    stride_h = stride_hh.to(tl.int64)
    for i in tl.static_range(H):
        x = tl.load(heads_ptr + i * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(rows_ptr + us * H + i, mask=u_ok, other=0.0)
        acc += r[:, None] * x[None, :]
    ptrs = out_ptr + us.to(tl.int64)[:, None] * stride_ou + offs[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=u_ok[:, None] & ok[None, :])


def merge_config(U: int, *, interpreter: bool) -> tuple[int, int, int]:
    """``(U_PAD, BLOCK, num_warps)``: ~16 fp32 accumulators per thread on a GPU (4 warps), so the
    H unrolled loads of a program stay in registers; the interpreter pays per program, not per
    element, and gets wide blocks."""
    u_pad = triton.next_power_of_2(U)
    if interpreter:
        return u_pad, 4096, 4
    return u_pad, max(256, 2048 // u_pad), 4


def merge_heads_triton(heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[U,V,d]`` in the heads' dtype from ``heads [H,V,d]`` (each head contiguous) and fp32
    ``rows [U,H]`` (any device: copied to the heads' device)."""
    H, V, d = heads.shape
    if heads.stride(2) != 1 or heads.stride(1) != d:
        raise ValueError(f"merge_heads_triton needs each head contiguous ([V, d] with strides "
                         f"({d}, 1)), got strides {heads.stride()}")
    if H > MAX_MERGE_HEADS:
        raise ValueError(f"merge_heads_triton unrolls over at most {MAX_MERGE_HEADS} heads, got {H}")
    if rows.dim() != 2 or rows.shape[1] != H:
        raise ValueError(f"rows must have shape [U, {H}], got {tuple(rows.shape)}")
    U = rows.shape[0]
    rows = rows.to(heads.device, torch.float32).contiguous()
    merged = torch.empty(U, V, d, dtype=heads.dtype, device=heads.device)
    u_pad, block, warps = merge_config(U, interpreter=heads.device.type == "cpu")
    N = V * d
    _merge_kernel[(triton.cdiv(N, block),)](heads, rows, merged, N, U, heads.stride(0), N, H=H,
                                            U_PAD=u_pad, BLOCK=block, num_warps=warps)
    return merged
