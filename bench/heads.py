"""Bench section ``heads``: one decode step's H-head projection + sampling, fused vs torch eager.

Per (H, B, d), V = 151936, bf16 on GPU, side by side:

- (a) ``eager``: the paper's path — H matmuls (bf16 logits each), weighted sum, softmax,
  ``torch.multinomial``;
- (b) ``stacked``: one GEMM over the heads stacked along K (``[w_1 h, …, w_H h] @ W_cat.T``), then
  softmax + ``torch.multinomial``;
- ``fused``: ``triton_kernels.multihead_sample`` with the shared-weights merge off, so every call
  reads all H heads (with it on, B = 1 would be one merged head: U = 1 < H);
- ``shared``: the same call with one weight vector for every row (U = 1: the merged-head fast
  path, merged once before timing).

The floor is reading the heads once: ``H·2·d·V`` bytes at the measured device copy bandwidth.
Targets (H100, not asserted): fused ≥ 85% of the floor for B ≤ 64, ≥ 1.5× faster than (a) at
H = 3, shared within 5% of fused at H = 1. On CPU only (a) and (b) run, at small sizes: Triton's
interpreter times mean nothing, and CPU times say little about a GPU.
"""
from __future__ import annotations

import contextlib

import torch

from bench.common import (BenchContext, copy_bandwidth, peak_memory_bytes, reset_peak_memory,
                          timeit)
from triton_kernels import merge_cache, multihead_sample

TEMPERATURE = 0.8
GPU_VOCAB = 151936  # Qwen2.5
GPU_GRID = [(H, d, [1, 8, 64]) for d in (896, 1536) for H in (1, 2, 3, 5)]  # (H, d, batches)


def eager_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(a): per-head logits in the model dtype, summed with the weights, softmax, multinomial."""
    z = sum(weights[:, i:i + 1] * (hidden @ heads[i].t()).float() for i in range(heads.shape[0]))
    return torch.multinomial(torch.softmax(z / TEMPERATURE, dim=-1), 1).squeeze(1)


def stacked_sample(hidden: torch.Tensor, stacked: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """(b): ``stacked = [W_1 … W_H]`` as ``[V, H·d]``; one GEMM, then softmax + multinomial."""
    x = (weights[:, :, None] * hidden[:, None, :].float()).reshape(hidden.shape[0], -1)
    z = (x.to(hidden.dtype) @ stacked.t()).float()
    return torch.multinomial(torch.softmax(z / TEMPERATURE, dim=-1), 1).squeeze(1)


@contextlib.contextmanager
def _all_heads():
    """Turn the shared-weights merge off (budget 0), so the fused kernel reads all H heads."""
    budget = merge_cache.max_bytes
    merge_cache.max_bytes = 0
    try:
        yield
    finally:
        merge_cache.max_bytes = budget


def _extra_peak_mb(fn, device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what is already live (GPU only)."""
    if device.type != "cuda":
        return None
    reset_peak_memory(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    return (peak_memory_bytes(device) - base) / 2**20


def measure(H: int, d: int, V: int, batches: list[int], dtype: torch.dtype,
            device: torch.device, *, fused: bool, iters: int, floor_bw: float) -> list[dict]:
    """Rows for one head set (built once on the device) at each batch size in ``batches``;
    ``fused`` adds the Triton columns (GPU, or the interpreter when testing this module)."""
    g = torch.Generator(device=device).manual_seed(1000 * H + d)
    heads = torch.randn(H, V, d, generator=g, device=device, dtype=dtype).mul_(d**-0.5)
    stacked = heads.permute(1, 0, 2).reshape(V, H * d)  # W_cat for (b), built outside the timing
    weight_bytes = H * V * d * heads.element_size()
    floor_s = weight_bytes / floor_bw
    rows = []
    for B in batches:
        hidden = torch.randn(B, d, generator=g, device=device, dtype=dtype)
        weights = torch.softmax(torch.randn(B, H, generator=g, device=device), dim=-1)
        t_a = timeit(lambda: eager_sample(hidden, heads, weights), device, iters=iters)
        t_b = timeit(lambda: stacked_sample(hidden, stacked, weights), device, iters=iters)
        row = {"H": H, "B": B, "d": d, "V": V, "floor_us": floor_s * 1e6, "eager_us": t_a * 1e6,
               "stacked_us": t_b * 1e6, "eager/stacked": t_a / t_b}
        if fused:
            shared = weights[:1].expand(B, H).contiguous()

            def fused_call(w=weights):
                return multihead_sample(hidden, heads, w, temperature=TEMPERATURE, seed=1)

            with _all_heads():
                t_f = timeit(fused_call, device, iters=iters)
                fused_peak = _extra_peak_mb(fused_call, device)
            t_s = timeit(lambda: fused_call(shared), device, iters=iters)  # warm-up merges once
            row.update({"fused_us": t_f * 1e6, "shared_us": t_s * 1e6,
                        "fused_GB/s": weight_bytes / t_f / 1e9, "fused/floor": floor_s / t_f,
                        "eager/fused": t_a / t_f, "stacked/fused": t_b / t_f,
                        "eager_peak_MB": _extra_peak_mb(lambda: eager_sample(hidden, heads, weights),
                                                        device),
                        "fused_peak_MB": fused_peak})
        rows.append(row)
    return rows


def run(ctx: BenchContext) -> list[dict]:
    bw = copy_bandwidth(ctx.device)
    if ctx.is_cuda:
        grid = GPU_GRID if not ctx.quick else [(H, d, [1, 64]) for d in (896,) for H in (1, 3)]
        rows = [row for H, d, batches in grid
                for row in measure(H, d, GPU_VOCAB, batches, torch.bfloat16, ctx.device,
                                   fused=True, iters=10 if ctx.quick else 30, floor_bw=bw)]
        h1 = {(r["B"], r["d"]): r["fused_us"] for r in rows if r["H"] == 1}
        for r in rows:
            if (r["B"], r["d"]) in h1:
                r["shared/H1"] = r["shared_us"] / h1[(r["B"], r["d"])]
        ctx.note(f"floor = H·2·d·V bytes at the measured copy bandwidth {bw / 1e9:.0f} GB/s; "
                 "fused/floor is the fraction of it reached (target ≥ 0.85 for B ≤ 64). "
                 "shared: one weight vector for all rows → one merged head "
                 "(target: shared/H1 ≤ 1.05).")
        ctx.note("eager/stacked use torch.multinomial over a materialised softmax; fused writes "
                 "only per-tile partials (peak columns: extra memory one call allocates).")
        return rows
    V, d = (8192, 128) if ctx.quick else (32768, 256)
    rows = [row for H in (1, 3) for row in measure(H, d, V, [1, 8], torch.float32, ctx.device,
                                                   fused=False, iters=5, floor_bw=bw)]
    ctx.note("CPU: torch paths (a) eager and (b) stacked only, fp32, small V. The fused Triton "
             "kernels run here only in the interpreter, whose times mean nothing; CPU times say "
             "little about a GPU. floor_us uses the CPU's measured copy bandwidth.")
    return rows
