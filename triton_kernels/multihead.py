"""Launchers for the fused multi-head projection and sampling kernels, and the device dispatch.

Dispatch, the one rule: CUDA tensors → the Triton kernels; CPU tensors → the same kernels in
Triton's interpreter when ``TRITON_INTERPRET=1`` (tests; must be set before Triton is imported),
else ``triton_kernels.reference`` (the engine's CPU path).

Both launchers validate their arguments (``ValueError`` naming the argument), then go through the
shared-weights plan (``triton_kernels.merge``: U < H distinct weight rows → U merged heads). Neither
synchronises with the host once the plan for a weights tensor is known, and with a precomputed
plan (``merge_shared_heads``) both are capturable in a CUDA graph: ``seed``/``offset`` may be
1-element int64 device tensors that the kernels read on the device.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from triton_kernels import reference
from triton_kernels.checks import check_out, check_projection, check_sampling
from triton_kernels.kernels import (MODE_GREEDY, MODE_GUMBEL, MODE_TOPK, _logits_kernel,
                                    _sample_finish_kernel, _sample_partials_kernel)
from triton_kernels.merge import plan_heads

# fp32 heads get true fp32 products (TF32 would miss the 1e-5 contract); bf16/fp16 dots ignore it.
DOT_PRECISION = "ieee"


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    block_b: int  # rows per program; B ≤ 64 → one row tile on GPU, so the heads are read once
    block_v: int  # vocabulary columns per tile
    block_k: int  # reduction step over d
    max_parts: int  # sampling: at most this many V chunks (programs per row tile), top-k only on GPU
    finish_elems: int  # finish kernel: rows × parts held by one program
    num_warps: int = 4
    num_stages: int = 3


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(B: int, V: int, d: int, dtype: torch.dtype, device: torch.device,
                  kpad: int = 1) -> LaunchConfig:
    """Tile sizes. GPU values are untuned defaults for an H100 (memory-bound decode). The
    interpreter pays per program and per op, not per element: it gets wide row tiles, and few V
    chunks so that tests still cross tile and chunk boundaries."""
    block_v = max(kpad, min(128, max(16, triton.next_power_of_2(V))))
    block_k = min(64 if dtype != torch.float32 else 32, max(16, triton.next_power_of_2(d)))
    if device.type == "cuda":
        block_b = 16 if B <= 16 else 32 if B <= 32 else 64
        # Greedy/sampling: one tile per program (its partials are 4 numbers per row). Top-k: a few
        # programs per SM, each merging several tiles, so its kpad candidates per row stay few.
        max_parts = 4 * _num_sms(device) if kpad > 1 else triton.cdiv(V, block_v)
        return LaunchConfig(block_b, block_v, block_k, max_parts, 4096)
    return LaunchConfig(min(256, max(16, triton.next_power_of_2(B))), block_v, block_k, 2, 1 << 16)


def _upcast_dot(hidden: torch.Tensor) -> bool:
    # Triton's interpreter multiplies the raw bits of bf16 dot operands (triton-lang/triton#11584):
    # there, and only there, the kernels upcast them to fp32 (exact) before the dot.
    return hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16


def _projection_args(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> tuple:
    return (hidden.shape[0], heads.shape[1], heads.shape[2], heads.shape[0],
            hidden.stride(0), hidden.stride(1), weights.stride(0), weights.stride(1),
            heads.stride(0), heads.stride(1), heads.stride(2))


def multihead_logits(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_i weights[b,i] · heads[i] @ hidden[b]`` → float32 ``[B,V]`` (written into ``out`` if given).

    ``hidden [B,d]`` and ``heads [H,V,d]`` share one dtype (fp32/bf16/fp16); ``weights [B,H]`` any
    float dtype (used in fp32, must be finite); fp32 accumulation.
    """
    if not _use_triton(hidden.device):
        return reference.multihead_logits(hidden, heads, weights, out=out)
    check_projection(hidden, heads, weights)
    check_out(out, hidden, heads.shape[1])
    heads, weights = plan_heads(heads, weights)
    B, V, d = hidden.shape[0], heads.shape[1], heads.shape[2]
    if out is None:
        out = torch.empty(B, V, dtype=torch.float32, device=hidden.device)
    cfg = launch_config(B, V, d, hidden.dtype, hidden.device)
    grid = (triton.cdiv(B, cfg.block_b), triton.cdiv(V, cfg.block_v))
    _logits_kernel[grid](hidden, weights, heads, out, *_projection_args(hidden, heads, weights),
                         out.stride(0), BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v,
                         BLOCK_K=cfg.block_k, DOT_PRECISION=DOT_PRECISION,
                         UPCAST_DOT=_upcast_dot(hidden),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float = 1.0, top_k: int = 0, seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused projection + sampling: ``(tokens int64 [B], logprobs float32 [B])``.

    ``temperature`` 0 = greedy (ties → lowest index); else an exact draw from ``softmax(z/T)`` by
    Gumbel-max, restricted to the ``top_k`` largest ``z/T`` when ``0 < top_k ≤ 128`` (ties → lower
    index). ``logprobs`` = ``log_softmax(z/T)`` at the token, untruncated (T = 0 → T = 1). ``seed``
    and ``offset`` (None = 0) are ints or 1-element int64 tensors on the inputs' device; the same
    (seed, offset) gives the same tokens, and every row draws independent numbers.
    """
    if not _use_triton(hidden.device):
        return reference.multihead_sample(hidden, heads, weights, temperature=temperature,
                                          top_k=top_k, seed=seed, offset=offset)
    check_projection(hidden, heads, weights)
    check_sampling(temperature, top_k, seed, offset, hidden.device)
    heads, weights = plan_heads(heads, weights)
    B, V, d = hidden.shape[0], heads.shape[1], heads.shape[2]
    offset = 0 if offset is None else offset
    if temperature == 0 or top_k == 1:
        mode = MODE_GREEDY  # top-1 of z/T is the argmax, at any T > 0
    elif 0 < top_k < V:
        mode = MODE_TOPK
    else:
        mode = MODE_GUMBEL  # top_k = 0, or top_k ≥ V keeps every token
    kpad = triton.next_power_of_2(top_k) if mode == MODE_TOPK else 1
    cfg = launch_config(B, V, d, hidden.dtype, hidden.device, kpad)
    n_tiles = triton.cdiv(V, cfg.block_v)
    tiles_per_part = triton.cdiv(n_tiles, min(n_tiles, cfg.max_parts))
    n_parts = triton.cdiv(n_tiles, tiles_per_part)

    dev = hidden.device
    part_max = torch.empty(B, n_parts, dtype=torch.float32, device=dev)
    part_sumexp = torch.empty_like(part_max)
    if mode == MODE_TOPK:
        part_best = part_token = part_scaled = part_max  # unused by the top-k kernels
        part_keys = torch.empty(B, n_parts, kpad, dtype=torch.int64, device=dev)
    else:
        part_best, part_scaled = torch.empty_like(part_max), torch.empty_like(part_max)
        part_token = torch.empty(B, n_parts, dtype=torch.int32, device=dev)
        part_keys = part_max  # unused
    rng = dict(SEED_IS_PTR=isinstance(seed, torch.Tensor), OFFSET_IS_PTR=isinstance(offset, torch.Tensor))
    grid = (triton.cdiv(B, cfg.block_b), n_parts)
    _sample_partials_kernel[grid](
        hidden, weights, heads, seed, offset, part_max, part_sumexp, part_best, part_token,
        part_scaled, part_keys, *_projection_args(hidden, heads, weights),
        1.0 / temperature if temperature > 0 else 1.0, n_tiles, tiles_per_part, n_parts,
        MODE=mode, LOG_KPAD=kpad.bit_length() - 1, BLOCK_B=cfg.block_b,
        LOG_BLOCK_V=cfg.block_v.bit_length() - 1, BLOCK_K=cfg.block_k,
        DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=_upcast_dot(hidden), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **rng)

    # Global top-k of the per-chunk candidates: exact (each chunk kept its own top kpad ≥ top_k).
    cand = part_max
    if mode == MODE_TOPK:
        cand = torch.topk(part_keys.view(B, -1), top_k, dim=1, sorted=False).values.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    logprobs = torch.empty(B, dtype=torch.float32, device=dev)
    block_p = min(1024, triton.next_power_of_2(n_parts))
    block_r = min(triton.next_power_of_2(B), max(1, cfg.finish_elems // max(block_p, kpad)))
    _sample_finish_kernel[(triton.cdiv(B, block_r),)](
        part_max, part_sumexp, part_best, part_token, part_scaled, cand, seed, offset, tokens,
        logprobs, B, n_parts, top_k, MODE=mode, BLOCK_R=block_r, BLOCK_P=block_p, TOPK_PAD=kpad,
        num_warps=4, **rng)
    return tokens, logprobs
