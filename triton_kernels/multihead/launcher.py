"""Launchers for the fused multi-head projection and sampling kernels, and the device dispatch.

Dispatch, the one rule: CUDA tensors → the Triton kernels; CPU tensors → the same kernels in
Triton's interpreter when ``TRITON_INTERPRET=1`` (tests; must be set before Triton is imported),
else ``triton_kernels.multihead.cpu`` (the engine's CPU path: the reference's results, computed cheaply).

Both launchers validate their arguments (``ValueError`` naming the argument) and read the heads
through a shared-weights plan (``triton_kernels.multihead.heads_plan.HeadsPlan``: U < H distinct weight rows →
U merged heads), given by the caller (``plan=``) or built one-off for the call (no merge, one host
read of the weights: see ``triton_kernels.multihead.heads_plan``). A decode loop prepares a ``SamplingPlan``
(checks, plan, config, scratch) once and then only launches. With a plan's operands
(``merge_shared_heads``) both are capturable in a CUDA graph: ``seed``/``offset`` may be
1-element int64 device tensors and ``temperature`` a float32 device tensor (one value, or one per
row), all read by the kernels on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from triton_kernels.checks import (MAX_TOP_K, check_mixture, check_out, check_projection,
                                   check_sampling)
from triton_kernels.device import DOT_PRECISION, interpreting, num_sms, upcast_dot
from triton_kernels.multihead import cpu
from triton_kernels.multihead.kernels import (MODE_FILTER, MODE_GREEDY, MODE_GUMBEL, MODE_TOPK,
                                              _logits_kernel, _sample_filter_kernel,
                                              _sample_finish_kernel, _sample_partials_kernel)
from triton_kernels.multihead.heads_plan import HeadsPlan, checked_plan


def use_triton(device: torch.device) -> bool:
    """The multi-head op's device dispatch, decided here only: CUDA → the Triton kernels; CPU →
    the same kernels in Triton's interpreter under ``TRITON_INTERPRET=1`` (the tests), else the
    CPU path ``triton_kernels.multihead.cpu``."""
    return device.type == "cuda" or interpreting()


@dataclass(frozen=True)
class LaunchConfig:
    """Every launch parameter of one call, chosen in one place (the sm_90 compile test uses it)."""

    block_b: int  # rows per program; B ≤ 64 → one row tile on GPU, so the heads are read once
    block_v: int  # vocabulary columns per tile (≥ kpad)
    block_k: int  # reduction step over K = H·d
    num_warps: int
    num_stages: int
    n_tiles: int  # V tiles
    tiles_per_part: int  # sampling: V tiles merged by one program into one partial per row
    n_parts: int  # sampling: partials per row
    finish_rows: int  # finish kernel: rows per program
    finish_parts: int  # finish kernel: partials loaded per step
    sort_rows: int = 0  # top-k: rows the bitonic network sorts (the live ones; 0 = block_b)
    cand_parts: int = 1  # top-k finish: parts' candidate runs merged per step (power of two)
    finish_warps: int = 4  # finish kernel: 8 where a program holds 4096 partials (4 spill 8 B)
    filter_block: int = 1024  # MODE_FILTER: z/T entries per step of a pass over a row
    filter_warps: int = 8  # MODE_FILTER: one program per row


# GPU tiles per shape, picked from this table (no autotuning: a captured CUDA graph must not
# benchmark configs). Rows: (largest B, top-k?) -> GpuTiles. Untuned estimates for sm_90 decoding,
# which is bound by how many bytes of the heads each SM keeps in flight: 32-64 KB of the heads per
# program (num_stages · block_v · block_k · itemsize; shared memory per program adds the hidden
# tile, ≤ 98 KB of the 227 KB limit). Every row was chosen so that no config spills with Triton 3.6
# (the GPU machine's) nor 3.9. Under 3.6, ptxas spills 8 B at ~168 registers in several spots the
# 3.9 build does not: 16-bit Gumbel sampling at B ≤ 32 with BLOCK_K = 64 at any depth ≥ 3 (so
# those rows run BLOCK_K = 32, 6 stages: 48 KB), fp32 at B ≤ 32 with 8 warps (4 there), fp32 top-k
# with per-row temperatures at 3 stages (2 there). Deeper pipelines, and BLOCK_V = 256 at B = 64,
# spill too (5 stages at B ≤ 16 with BLOCK_K = 64: 24 B of stack; 64 x 256 with per-row
# temperatures: 288 B), so they wait for a measurement that says they pay. Top-k keeps kpad int64
# keys per row in registers beside the fp32 tile: at most 32 rows per tile there (B > 32 runs two
# row tiles, adjacent in the grid, so the second reads the heads from L2).
# tests/test_triton_multihead_compile.py builds every row for sm_90, prints registers and stack, and
# requires no spills, under every Triton it is given (tests/aot_subprocess.py).
@dataclass(frozen=True)
class GpuTiles:
    block_b: int
    block_v: int
    warps16: int  # 16-bit heads: warps, reduction step, pipeline depth
    block_k16: int
    stages16: int
    warps32: int  # fp32 heads: warps and depth (reduction step always 32)
    stages32: int


GPU_TILES: tuple[tuple[int, bool, GpuTiles], ...] = (
    (16, False, GpuTiles(16, 128, 4, 32, 6, 4, 4)),
    (32, False, GpuTiles(32, 128, 8, 32, 6, 4, 4)),
    (64, False, GpuTiles(64, 128, 8, 64, 4, 8, 4)),
    (16, True, GpuTiles(16, 128, 8, 64, 3, 8, 2)),
    (32, True, GpuTiles(32, 128, 8, 64, 4, 8, 2)),
)


def gpu_tiles(B: int, kpad: int) -> GpuTiles:
    """The ``GPU_TILES`` row for B rows (B > 64: 64-row tiles)."""
    rows = [(b, tiles) for b, topk, tiles in GPU_TILES if topk == (kpad > 1)]
    return next((tiles for b, tiles in rows if B <= b), rows[-1][1])


@functools.lru_cache(maxsize=1024)
def launch_config(B: int, V: int, d: int, dtype: torch.dtype, *, num_sms: int | None,
                  kpad: int = 1, filtered: bool = False) -> LaunchConfig:
    """Tiles for a GPU with ``num_sms`` SMs (``GPU_TILES``), or for the interpreter
    (``num_sms=None``), which pays per program and per op, not per element: it gets wide row
    tiles, and two V chunks so that tests still cross tile and chunk boundaries.
    """
    wide = dtype == torch.float32
    if num_sms is None:
        block_k = 64 if not wide else 32
        block_v = max(kpad, min(128, max(16, triton.next_power_of_2(V))))
        block_b = min(256, max(16, triton.next_power_of_2(B)))
        num_warps, num_stages, max_parts, finish_elems = 4, 3, 2, 1 << 16
    else:
        tiles = gpu_tiles(B, kpad)
        block_b = tiles.block_b
        num_warps, block_k, num_stages = ((tiles.warps32, 32, tiles.stages32) if wide else
                                          (tiles.warps16, tiles.block_k16, tiles.stages16))
        if filtered and not wide:  # MODE_FILTER's z/T store: 5-6 stages spill 8-16 B (3.9)
            num_stages = min(num_stages, 4)
        block_v = max(kpad, min(tiles.block_v, max(16, triton.next_power_of_2(V))))
        finish_elems = 4096
    block_k = min(block_k, max(16, triton.next_power_of_2(d)))
    n_tiles = triton.cdiv(V, block_v)
    if num_sms is not None:
        # Greedy/sampling: one tile per program (its partials are 4 numbers per row). Top-k: one
        # program per SM, each merging many tiles, so the candidates per row stay few.
        max_parts = num_sms if kpad > 1 else n_tiles
    tiles_per_part = triton.cdiv(n_tiles, min(n_tiles, max_parts))
    n_parts = triton.cdiv(n_tiles, tiles_per_part)
    finish_parts = min(1024, triton.next_power_of_2(n_parts))
    sort_rows = min(block_b, triton.next_power_of_2(B))
    cand_parts = 1
    if kpad > 1:  # the finish merges up to 1024 candidate keys per row at a time
        cand_parts = max(1, min(triton.next_power_of_2(n_parts), 1024 // kpad))
        finish_elems = finish_elems if num_sms is None else 1024
    finish_rows = min(triton.next_power_of_2(B),
                      max(1, finish_elems // max(finish_parts, kpad * cand_parts)))
    finish_warps = 8 if num_sms is not None and finish_rows * finish_parts >= 4096 else 4
    # 2048+ entries per step leave 8-16 B of stack in the filter kernel under one Triton or the
    # other (a 64-bit key per entry); 1024 with 8 warps does not.
    filter_block, filter_warps = (128, 4) if num_sms is None else (1024, 8)
    return LaunchConfig(block_b, block_v, block_k, num_warps, num_stages, n_tiles,
                        tiles_per_part, n_parts, finish_rows, finish_parts, sort_rows, cand_parts,
                        finish_warps, filter_block, filter_warps)


def filters(top_p: float | torch.Tensor, min_p: float | torch.Tensor) -> bool:
    """Whether top-p or min-p may filter: a tensor (its values stay on the device), top_p < 1 or
    min_p > 0. Without them the kernels run exactly the unfiltered modes."""
    return (isinstance(top_p, torch.Tensor) or isinstance(min_p, torch.Tensor) or top_p < 1
            or min_p > 0)


def sampling_mode(temperature: float | torch.Tensor, top_k: int, V: int,
                  top_p: float | torch.Tensor = 1.0,
                  min_p: float | torch.Tensor = 0.0) -> tuple[int, int]:
    """``(mode, kpad)``: greedy, Gumbel sampling, top-k (``kpad``: power of 2 ≥ top_k; top-p and
    min-p then filter its candidates in the finish kernel), or MODE_FILTER (top-p/min-p without
    a top-k of at most ``MAX_TOP_K``, or a larger top-k: the filter kernel's passes over z/T).

    A temperature tensor is not read on the host: its mode depends on the other options only,
    and its T = 0 rows are greedy inside the sampling modes (see triton_kernels.multihead.kernels)."""
    greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    if greedy or top_k == 1:
        return MODE_GREEDY, 1  # top-1 of z/T is the argmax, at any T > 0; every filter keeps it
    if 0 < top_k < V and top_k <= MAX_TOP_K:
        return MODE_TOPK, triton.next_power_of_2(top_k)
    if filters(top_p, min_p) or MAX_TOP_K < top_k < V:
        return MODE_FILTER, 1
    return MODE_GUMBEL, 1  # top_k = 0, or top_k ≥ V keeps every token


def _device_option(value: float | torch.Tensor, device: torch.device
                   ) -> tuple[torch.Tensor, int]:
    """``(float32 tensor, stride)`` the kernels read a top_p/min_p from: the caller's tensor
    (stride 0 when it holds one value for every row), or a number put on the device once."""
    if isinstance(value, torch.Tensor):
        return value, (value.stride(0) if value.numel() > 1 else 0)
    return torch.full((1,), float(value), dtype=torch.float32, device=device), 0


def _config(B: int, V: int, d: int, dtype: torch.dtype, device: torch.device,
            kpad: int = 1, filtered: bool = False) -> LaunchConfig:
    sms = num_sms(device) if device.type == "cuda" else None
    return launch_config(B, V, d, dtype, num_sms=sms, kpad=kpad, filtered=filtered)


def _projection_args(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> tuple:
    return (hidden.shape[0], heads.shape[1], heads.shape[2], heads.shape[0],
            hidden.stride(0), hidden.stride(1), weights.stride(0), weights.stride(1),
            heads.stride(0), heads.stride(1), heads.stride(2))


def multihead_logits(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     out: torch.Tensor | None = None,
                     plan: HeadsPlan | None = None) -> torch.Tensor:
    """``Σ_i weights[b,i] · heads[i] @ hidden[b]`` → float32 ``[B,V]`` (into ``out`` if given).

    ``hidden [B,d]`` and ``heads [H,V,d]`` share one dtype (fp32/bf16/fp16); ``weights [B,H]`` any
    float dtype (used in fp32, must be finite); fp32 accumulation. ``plan``: the caller's
    ``plan_heads(heads, weights)`` (merged heads when rows share weights); None = a one-off plan.
    """
    if not use_triton(hidden.device):
        return cpu.multihead_logits(hidden, heads, weights, out=out, plan=plan)
    check_projection(hidden, heads, weights)
    check_out(out, hidden, heads.shape[1])
    plan = checked_plan(heads, weights, plan, merge=False)
    heads, weights = plan.heads, plan.weights
    B, V = hidden.shape[0], heads.shape[1]
    if out is None:
        out = torch.empty(B, V, dtype=torch.float32, device=hidden.device)
    cfg = _config(B, V, heads.shape[2], hidden.dtype, hidden.device)
    grid = (triton.cdiv(B, cfg.block_b), cfg.n_tiles)
    _logits_kernel[grid](hidden, weights, heads, out, *_projection_args(hidden, heads, weights),
                         out.stride(0), BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v,
                         BLOCK_K=cfg.block_k, DOT_PRECISION=DOT_PRECISION,
                         UPCAST_DOT=upcast_dot(hidden.device, hidden.dtype), num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)
    return out


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                     top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                     seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None,
                     plan: HeadsPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused projection + sampling: ``(tokens int64 [B], logprobs float32 [B])``.

    ``temperature`` 0 = greedy (ties → lowest index); else an exact draw from ``softmax(z/T)`` by
    Gumbel-max, restricted to what top-k (any ``top_k``; ``≥ V`` keeps every token), then top-p
    over the renormalised remainder, then min-p relative to the top probability leave (ties →
    lower index; the semantics: ``triton_kernels.reference``). ``logprobs`` =
    ``log_softmax(z/T)`` at the token, untruncated by any filter (T = 0 → T = 1). ``seed``
    and ``offset`` (None = 0) are ints or 1-element int64 tensors on the inputs' device; the same
    (seed, offset) gives the same tokens, and every row draws independent numbers.
    ``temperature`` may also be a float32 tensor on the inputs' device, ``[]``/``[1]`` (every row)
    or ``[B]`` (per row; 0 = that row greedy), read on the device like ``seed``/``offset``: a
    captured CUDA graph samples at whatever it holds at replay. Its values are not validated
    (that would read them on the host): negative or non-finite entries are the caller's bug.
    ``top_p`` (in (0, 1], 1 = off) and ``min_p`` (in [0, 1], 0 = off) are numbers or float32
    tensors of the same shapes, read on the device the same way.

    ``plan``: the caller's ``plan_heads(heads, weights)``; None = a one-off plan (no merge, one
    host read of the weights). Every call validates and allocates its scratch afresh; a decode
    loop builds a `SamplingPlan` once instead.
    """
    check_projection(hidden, heads, weights)
    sampling = SamplingPlan(heads, weights, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, seed=seed, offset=offset,
                            plan=checked_plan(heads, weights, plan, merge=False))
    return sampling(hidden)


class SamplingPlan:
    """One sampling call prepared once and owned by its caller, for a decode loop's eager steps.

    Built from everything but the hidden states: it validates them, holds the shared-weights plan
    ``heads_plan`` (given as ``plan``, else ``plan_heads(heads, weights)``: merged heads when the
    rows share U < H weight vectors), picks the mode and launch config, and allocates the partials
    scratch. A call ``plan(hidden)`` then checks ``hidden``'s shape, dtype and device, allocates
    the two outputs and launches: no host reads, and the top-k candidates are merged on the device.

    ``temperature``/``top_p``/``min_p``/``seed``/``offset`` tensors are bound by reference and
    read on the device at every call (advance ``offset`` in place between calls); ints and floats
    are fixed. The weights'
    *values* and the heads' are bound when the plan is built (they decide the merge): after
    changing them, build a new plan (a call on a plan whose heads or weights changed in place
    raises ``ValueError``; inference tensors carry no version, so that goes unseen). The scratch
    is the plan's own: calls on one plan must not run concurrently on different streams.
    """

    def __init__(self, heads: torch.Tensor, weights: torch.Tensor, *,
                 temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                 top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                 seed: int | torch.Tensor = 0, offset: int | torch.Tensor | None = None,
                 plan: HeadsPlan | None = None) -> None:
        check_mixture(heads, weights)
        B, V, d = weights.shape[0], heads.shape[1], heads.shape[2]
        dev = heads.device
        check_sampling(temperature, top_k, seed, offset, dev, B, top_p, min_p)
        plan = checked_plan(heads, weights, plan, merge=True)
        self.shape = (B, d)
        self.dtype, self.device = heads.dtype, dev
        self.heads_plan = plan
        self.heads, self.weights = plan.heads, plan.weights
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.top_p, self.min_p = top_p, min_p
        self.offset = 0 if offset is None else offset
        self.triton = use_triton(dev)
        if not self.triton:
            return
        self.mode, kpad = sampling_mode(temperature, top_k, V, top_p, min_p)
        cfg = _config(B, V, d, heads.dtype, dev, kpad, filtered=self.mode == MODE_FILTER)
        part_max = torch.empty(B, cfg.n_parts, dtype=torch.float32, device=dev)
        part_sumexp = torch.empty_like(part_max)
        if self.mode in (MODE_TOPK, MODE_FILTER):
            part_best = part_token = part_scaled = part_max  # unused by these modes' kernels
            part_keys = (torch.empty(B, cfg.n_parts, kpad, dtype=torch.int64, device=dev)
                         if self.mode == MODE_TOPK else part_max)
        else:
            part_best, part_scaled = torch.empty_like(part_max), torch.empty_like(part_max)
            part_token = torch.empty(B, cfg.n_parts, dtype=torch.int32, device=dev)
            part_keys = part_max  # unused
        # MODE_FILTER: z/T of every row, for the filter kernel's passes (else a placeholder).
        scaled = (torch.empty(B, V, dtype=torch.float32, device=dev) if self.mode == MODE_FILTER
                  else part_max)
        if filters(top_p, min_p):
            top_p_t, stride_p = _device_option(top_p, dev)
            min_p_t, stride_mp = _device_option(min_p, dev)
        else:  # never read (no filter): placeholder pointers, nothing allocated
            top_p_t, stride_p, min_p_t, stride_mp = part_max, 0, part_max, 0
        rng = dict(SEED_IS_PTR=isinstance(seed, torch.Tensor),
                   OFFSET_IS_PTR=isinstance(self.offset, torch.Tensor),
                   TEMP_IS_PTR=isinstance(temperature, torch.Tensor))
        if rng["TEMP_IS_PTR"]:  # stride 0: one temperature for every row
            inv_temp, temp = 1.0, temperature
            stride_t = temperature.stride(0) if temperature.numel() > 1 else 0
        else:  # the kernels never read temp (part_max is a placeholder pointer)
            inv_temp, temp, stride_t = 1.0 / temperature if temperature > 0 else 1.0, part_max, 0
        h, w = self.heads, self.weights
        # Kernel arguments after ``hidden`` (and its strides), fixed for the plan's lifetime.
        self._partials_grid = (triton.cdiv(B, cfg.block_b), cfg.n_parts)
        self._partials_head = (w, h, seed, self.offset, part_max, part_sumexp, part_best,
                               part_token, part_scaled, part_keys, scaled, scaled.stride(0),
                               B, V, d, h.shape[0])
        self._partials_tail = (w.stride(0), w.stride(1), h.stride(0), h.stride(1), h.stride(2),
                               inv_temp, temp, stride_t, cfg.n_tiles, cfg.tiles_per_part,
                               cfg.n_parts)
        self._partials_kw = dict(MODE=self.mode, LOG_KPAD=kpad.bit_length() - 1,
                                 SORT_ROWS=cfg.sort_rows or cfg.block_b, BLOCK_B=cfg.block_b, LOG_BLOCK_V=cfg.block_v.bit_length() - 1,
                                 BLOCK_K=cfg.block_k, DOT_PRECISION=DOT_PRECISION,
                                 UPCAST_DOT=upcast_dot(dev, heads.dtype),
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, **rng)
        self._finish_grid = (triton.cdiv(B, cfg.finish_rows),)
        self._finish_head = (part_max, part_sumexp, part_best, part_token, part_scaled,
                             part_keys, seed, self.offset, temp, stride_t, top_p_t, stride_p,
                             min_p_t, stride_mp)
        self._finish_tail = (B, cfg.n_parts, top_k)
        self._finish_kw = dict(MODE=self.mode, BLOCK_R=cfg.finish_rows,
                               BLOCK_P=cfg.finish_parts, TOPK_PAD=kpad,
                               LOG_KPAD=kpad.bit_length() - 1,
                               LOG_CAND_PARTS=cfg.cand_parts.bit_length() - 1,
                               FILTER=self.mode == MODE_TOPK and filters(top_p, min_p),
                               num_warps=cfg.finish_warps, **rng)
        self._filter_head = (scaled, scaled.stride(0), part_max, part_sumexp, seed, self.offset,
                             temp, stride_t, top_p_t, stride_p, min_p_t, stride_mp)
        self._filter_tail = (V, cfg.n_parts, top_k)
        self._filter_kw = dict(KTH=MAX_TOP_K < top_k < V, BLOCK_P=cfg.finish_parts,
                               BLOCK=cfg.filter_block, num_warps=cfg.filter_warps, **rng)
        self.config = cfg

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens int64 [B], logprobs float32 [B])`` for ``hidden [B,d]`` (see the class)."""
        if (tuple(hidden.shape) != self.shape or hidden.dtype != self.dtype
                or hidden.device != self.device):
            raise ValueError(f"hidden must be {self.dtype} of shape {list(self.shape)} on "
                             f"{self.device} for this plan, got {hidden.dtype} "
                             f"{list(hidden.shape)} on {hidden.device}")
        if not self.heads_plan.is_current():
            raise ValueError("this SamplingPlan is stale: its heads or weights were changed in "
                             "place since it was built; build a new one")
        if not self.triton:
            return cpu.sample_logits(cpu.project(hidden, self.heads, self.weights),
                                     temperature=self.temperature, top_k=self.top_k,
                                     top_p=self.top_p, min_p=self.min_p, seed=self.seed,
                                     offset=self.offset)
        _sample_partials_kernel[self._partials_grid](
            hidden, *self._partials_head, hidden.stride(0), hidden.stride(1),
            *self._partials_tail, **self._partials_kw)
        tokens = torch.empty(self.shape[0], dtype=torch.int64, device=self.device)
        logprobs = torch.empty(self.shape[0], dtype=torch.float32, device=self.device)
        if self.mode == MODE_FILTER:
            _sample_filter_kernel[(self.shape[0],)](*self._filter_head, tokens, logprobs,
                                                    *self._filter_tail, **self._filter_kw)
        else:
            _sample_finish_kernel[self._finish_grid](*self._finish_head, tokens, logprobs,
                                                     *self._finish_tail, **self._finish_kw)
        return tokens, logprobs
