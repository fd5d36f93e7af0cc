"""Decode attention of K candidates per request: cascade attention over a shared prefix (ours:
the op the engine's shared_prefix layout calls, ``triton_kernels.cascade``: its Triton kernels on
CUDA, its CPU path on CPU) vs SDPA on the forked layout (each
candidate's own copy of the prefix, the decoder's GQA-folded SDPA call), vs prefix length.

Per row: R requests × K candidates, one new token each, Qwen2.5-0.5B's attention shape (2 KV
heads × 7 query heads, head_dim 64), every candidate 16 tokens into its step. Bytes read count the
K/V each method must load: ours reads each prefix once per request, SDPA on the forked layout
once per candidate. The floor is ours' bytes over the device's measured memory bandwidth
(`copy_bandwidth`: bytes read + written per second by a large copy), and "% of floor" how close
ours gets to it (the issue's GPU target: >= 70 %).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import BenchContext, copy_bandwidth, timeit
from triton_kernels.cascade import cascade_decode_attention

N_KV, G, HEAD_DIM = 2, 7, 64  # Qwen2.5-0.5B
STEP, SUFFIX = 16, 32  # tokens into the step, candidate slot capacity


def _inputs(r: int, k: int, prefix: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q = rand(r, k, N_KV * G, HEAD_DIM)
    pk, pv = rand(r, N_KV, prefix, HEAD_DIM), rand(r, N_KV, prefix, HEAD_DIM)
    sk, sv = rand(r, k, N_KV, SUFFIX, HEAD_DIM), rand(r, k, N_KV, SUFFIX, HEAD_DIM)
    plen = torch.full((r,), prefix, dtype=torch.int32, device=device)
    slen = torch.full((r, k), STEP, dtype=torch.int32, device=device)
    # The forked layout: each candidate slot holds the prefix, then its own step.
    total = prefix + SUFFIX
    fk = torch.cat((pk[:, None].expand(r, k, N_KV, prefix, HEAD_DIM), sk), dim=3)
    fv = torch.cat((pv[:, None].expand(r, k, N_KV, prefix, HEAD_DIM), sv), dim=3)
    fk, fv = fk.reshape(r * k, N_KV, total, HEAD_DIM), fv.reshape(r * k, N_KV, total, HEAD_DIM)
    mask = (torch.arange(total, device=device) < prefix + STEP)[None, None, None, :]
    return (q, pk, pv, plen, sk, sv, slen), (q.reshape(r * k, N_KV, G, HEAD_DIM), fk, fv, mask)


def run(ctx: BenchContext) -> list[dict]:
    dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
    esize = torch.empty((), dtype=dtype).element_size()
    r = 8 if ctx.is_cuda else 2
    prefixes = (256, 1024, 2048) if ctx.quick else (256, 512, 1024, 2048, 4096, 8192)
    bandwidth = copy_bandwidth(ctx.device)
    rows = []
    for prefix in prefixes:
        for k in (1, 4, 8):
            ours_args, (q, fk, fv, mask) = _inputs(r, k, prefix, dtype, ctx.device)
            out = torch.empty_like(ours_args[0]) if ctx.is_cuda else None  # as the engine calls it
            t_ours = timeit(lambda: cascade_decode_attention(*ours_args, out=out), ctx.device)
            t_sdpa = timeit(lambda: F.scaled_dot_product_attention(q, fk, fv, attn_mask=mask),
                            ctx.device)
            kv_token = 2 * N_KV * HEAD_DIM * esize  # K and V of one position
            bytes_ours = r * (prefix + k * STEP) * kv_token
            bytes_sdpa = r * k * (prefix + SUFFIX) * kv_token  # the mask does not skip loads
            floor = bytes_ours / bandwidth
            rows.append({"prefix": prefix, "K": k, "ours us": 1e6 * t_ours,
                         "sdpa-fork us": 1e6 * t_sdpa, "sdpa/ours": t_sdpa / t_ours,
                         "ours MiB read": bytes_ours / 2**20,
                         "fork MiB read": bytes_sdpa / 2**20,
                         "floor us": 1e6 * floor, "% of floor": 100 * floor / t_ours})
            del ours_args, q, fk, fv, out
    ctx.note(f"R={r} requests, {N_KV}x{G} heads, head_dim {HEAD_DIM}, {dtype}; candidates "
             f"{STEP} tokens into a step (slot capacity {SUFFIX}). Floor: ours' bytes at the "
             f"measured copy bandwidth ({bandwidth / 1e9:.0f} GB/s, read + write counted).")
    if not ctx.is_cuda:
        ctx.note("CPU: ours is torch's fused CPU flash attention per part + a log-sum-exp merge "
                 "(the engine's CPU path), one thread.")
    return rows
