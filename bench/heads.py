"""Bench section ``heads``: one decode step's H-head projection + sampling, fused vs torch eager.

Per (H, B, d), V = 151936, bf16 on GPU, side by side:

- (a) ``eager``: the paper's path — H matmuls (bf16 logits each), weighted sum, softmax,
  ``torch.multinomial`` (timed eagerly, as it runs);
- (b) ``stacked``: one GEMM over the heads stacked along K (``[w_1 h, …, w_H h] @ W_cat.T``), then
  softmax + ``torch.multinomial``;
- ``fused``: ``triton_kernels.multihead_sample`` (Gumbel sampling) without a plan, so every call
  reads all H heads (the general path); ``fused top-k``: the same at top-k 50; ``fused top-p`` /
  ``fused min-p``: the same at top-p 0.9 / min-p 0.05 (MODE_FILTER: z/T written, then the filter
  kernel's passes over it, one program per row);
- ``merged``: one weight vector for every row (U = 1: one merged head read, merged before timing).

The fused columns are timed as the engine runs them: captured once in a CUDA graph and replayed
(``bench.common.time_graph``), so no host work is counted as GPU time. The eager launcher's own
host cost per call is a column of its own: ``launcher_host_us`` (``multihead_sample``: checks,
plan, config, allocations, launches) and ``plan_host_us`` (a prepared ``SamplingPlan``: the
engine's eager step; target ≤ 10 µs).

Reported: % of the measured copy bandwidth reached (general path: H heads read; merged: U = 1),
merged / H=1 (a merged head should cost one head), top-k / Gumbel (target ≤ 1.15), top-p /
Gumbel and min-p / Gumbel (the filter kernel's cost; its docstring gives the expected ratios),
eager / fused
per B. What is physical: at H = 3, B ≤ 8 eager is three cuBLAS GEMMs over the same bytes near
full bandwidth, so fused can gain at most ~1.15× there; the real gains are fewer bytes (the
merged path) and no ``[B,V]`` logits at large B. On CPU only (a), (b) and the launchers' host
cost run, at small sizes: the Triton interpreter's times mean nothing.
"""
from __future__ import annotations

import torch

from bench.common import (BenchContext, copy_bandwidth, host_time, peak_memory_bytes,
                          reset_peak_memory, time_graph, timeit)
from triton_kernels import SamplingPlan, merge_shared_heads, multihead_sample

TEMPERATURE = 0.8
TOP_K = 50
TOP_P = 0.9
MIN_P = 0.05
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
    ``fused`` adds the Triton columns (GPU only: they are timed under CUDA-graph replay)."""
    g = torch.Generator(device=device).manual_seed(1000 * H + d)
    heads = torch.randn(H, V, d, generator=g, device=device, dtype=dtype).mul_(d**-0.5)
    stacked = heads.permute(1, 0, 2).reshape(V, H * d)  # W_cat for (b), built outside the timing
    head_bytes = V * d * heads.element_size()
    floor_s = H * head_bytes / floor_bw
    rows = []
    for B in batches:
        hidden = torch.randn(B, d, generator=g, device=device, dtype=dtype)
        weights = torch.softmax(torch.randn(B, H, generator=g, device=device), dim=-1)
        t_a = timeit(lambda: eager_sample(hidden, heads, weights), device, iters=iters)
        t_b = timeit(lambda: stacked_sample(hidden, stacked, weights), device, iters=iters)
        row = {"H": H, "B": B, "d": d, "V": V, "floor_us": floor_s * 1e6, "eager_us": t_a * 1e6,
               "stacked_us": t_b * 1e6, "eager/stacked": t_a / t_b}
        if fused:
            row.update(_fused_columns(hidden, heads, weights, iters=iters, floor_bw=floor_bw,
                                      head_bytes=head_bytes, t_eager=t_a, t_stacked=t_b))
        rows.append(row)
    return rows


def _fused_columns(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                   iters: int, floor_bw: float, head_bytes: int, t_eager: float,
                   t_stacked: float) -> dict:
    device, (B, H) = hidden.device, weights.shape
    offset = torch.zeros(1, dtype=torch.int64, device=device)

    def call(h=heads, w=weights, top_k=0, **filters):
        return multihead_sample(hidden, h, w, temperature=TEMPERATURE, top_k=top_k, seed=1,
                                offset=offset, **filters)

    # The general path (a call without a plan never merges): every call reads all H heads.
    t_f = time_graph(call, device, iters=iters)
    t_k = time_graph(lambda: call(top_k=TOP_K), device, iters=iters)
    t_p = time_graph(lambda: call(top_p=TOP_P), device, iters=iters)
    t_mp = time_graph(lambda: call(min_p=MIN_P), device, iters=iters)
    fused_peak = _extra_peak_mb(call, device)
    host_launcher = host_time(call, device)
    plan = SamplingPlan(heads, weights, temperature=TEMPERATURE, seed=1, offset=offset)
    host_plan = host_time(lambda: plan(hidden), device)
    merged, one_hot = merge_shared_heads(heads, weights[:1].expand(B, H).contiguous())
    if merged.shape[0] != 1:
        raise RuntimeError(f"the merge gave {merged.shape[0]} heads for one weight vector")
    t_m = time_graph(lambda: call(merged, one_hot), device, iters=iters)
    bw = lambda nbytes, t: 100 * nbytes / t / floor_bw
    return {"fused_us": t_f * 1e6, "fused_topk_us": t_k * 1e6, "fused_topp_us": t_p * 1e6,
            "fused_minp_us": t_mp * 1e6, "merged_us": t_m * 1e6,
            "fused_%bw": bw(H * head_bytes, t_f), "merged_%bw": bw(head_bytes, t_m),
            "topk/gumbel": t_k / t_f, "topp/gumbel": t_p / t_f, "minp/gumbel": t_mp / t_f,
            "eager/fused": t_eager / t_f,
            "stacked/fused": t_stacked / t_f,
            "launcher_host_us": host_launcher * 1e6, "plan_host_us": host_plan * 1e6,
            "eager_peak_MB": _extra_peak_mb(lambda: eager_sample(hidden, heads, weights), device),
            "fused_peak_MB": fused_peak}


def host_overhead_rows(device: torch.device, iters: int = 200) -> list[dict]:
    """The launchers' host cost on a shape too small for compute to matter (B = 1, V = d = 16):
    ``multihead_sample`` (validates and plans every call) vs a prepared ``SamplingPlan``."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(1, 16, generator=g, device=device)
    heads = torch.randn(3, 16, 16, generator=g, device=device)
    weights = torch.softmax(torch.randn(1, 3, generator=g, device=device), dim=-1)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    kw = dict(temperature=TEMPERATURE, seed=1, offset=offset)
    plan = SamplingPlan(heads, weights, **kw)
    t_l = host_time(lambda: multihead_sample(hidden, heads, weights, **kw), device, iters=iters)
    t_p = host_time(lambda: plan(hidden), device, iters=iters)
    return [{"H": 3, "B": 1, "d": 16, "V": 16, "launcher_host_us": t_l * 1e6,
             "plan_host_us": t_p * 1e6}]


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
                r["merged/H1"] = r["merged_us"] / h1[(r["B"], r["d"])]
        ctx.note(f"Card: {ctx.device_name}. %bw = bytes of heads read per call / time, as a "
                 f"percentage of the measured device copy bandwidth {bw / 1e9:.0f} GB/s (general "
                 "path: H heads; merged: one). fused/merged/top-k/top-p/min-p columns: CUDA-graph "
                 "replay; "
                 "launcher_host_us / plan_host_us: host time of one eager call (target plan "
                 "≤ 10 µs). Targets: merged/H1 ≤ 1.05, topk/gumbel ≤ 1.15.")
        ctx.note("eager/stacked run eagerly (torch.multinomial over a materialised softmax); fused "
                 "writes only per-tile partials (peak columns: extra memory one call allocates).")
        return rows
    V, d = (8192, 128) if ctx.quick else (32768, 256)
    rows = [row for H in (1, 3) for row in measure(H, d, V, [1, 8], torch.float32, ctx.device,
                                                   fused=False, iters=5, floor_bw=bw)]
    rows += host_overhead_rows(ctx.device)
    ctx.note(f"Card: {ctx.device_name}. CPU: torch paths (a) eager and (b) stacked only, fp32, "
             "small V; the fused Triton kernels run here only in the interpreter, whose times mean "
             "nothing. floor_us uses the CPU's measured copy bandwidth. Last row: host cost of one "
             "call on a tiny shape (the CPU path: checks and plan every call vs a SamplingPlan).")
    return rows
