"""Bench section `kv`: the KV-cache cost of one step-search step as the committed prefix grows.

A group of K = 5 candidate slots shares a prefix; each decodes a 32-token step; the winner is then
made the running cache for the next step. Per step, that costs:

- ours: ``kv_promote`` copies the winner's 32 new tokens into the K-1 siblings (flat in the
  prefix); ``copy`` is the raw ``kv_copy_ranges`` call alone, without the wrapper's index ops;
  ``cache_promote`` is the engine's `KVCache.promote` on host-built (winner, sibling) pairs (one
  gather of the lengths, one copy launch, one length scatter), and on a GPU also replayed from a
  CUDA graph, as the engine runs it (``cache_promote_graph``);
- deepcopy (the paper): ``copy.deepcopy`` of the running per-layer ``[(K, V), ...]`` cache, once per
  candidate (K copies of the whole prefix);
- index_copy: torch ``index_select`` + ``index_copy_`` of the winner's whole slot ``[0, len)`` into
  the siblings (a naive slot-cache promote).

Shapes of Qwen2.5-0.5B (L=24, n_kv=2, head_dim=64) and -1.5B (L=28, n_kv=2, head_dim=128), bf16.
A second table (case ``copy_ranges``) times many equal ranges of 16..1024 tokens. Bandwidth: bytes
moved = read + write of the copied tokens, against ``bench.common.copy_bandwidth``.

A third (case ``beam_promote``) times the engine's promote of one beam-search step (N = 4 beams of
K = 4 candidates, a 128-token prompt) in both cache layouts, as `SlotLayout.promote_index` plans it:
``kept`` (each beam's survivor is its own candidate: the step is copied to its siblings, one launch),
``one_move`` (one beam continues from another beam's candidate: it takes that candidate's whole text
past the prompt, one more launch) and ``all_moved`` (every survivor is of beam 0: N-1 moves). A move
copies the generated text to all K slots of the beam in the fork layout, once per beam (its
prefix) in the shared-prefix layout.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch

from bench.common import (BenchContext, copy_bandwidth, peak_memory_bytes, reset_peak_memory,
                          time_graph, timeit)
from mahalo_engine.cache import KVCache
from mahalo_engine.layouts import ForkSlots, SharedPrefixCache, SharedPrefixSlots, slot_layout
from mahalo_engine.ops import kv_copy_ranges, kv_promote

MODELS = {  # name -> (layers, kv heads, head_dim)
    "Qwen2.5-0.5B": (24, 2, 64),
    "Qwen2.5-1.5B": (28, 2, 128),
}
K = 5
STEP = 32
DTYPE = torch.bfloat16
RANGES = (16, 32, 128, 1024)


def _token_bytes(layers: int, heads: int, head_dim: int) -> int:
    """Bytes of one token of one slot over every layer, K and V."""
    return layers * 2 * heads * head_dim * torch.empty((), dtype=DTYPE).element_size()


def _bandwidth(ctx: BenchContext, moved: int, seconds: float, bandwidth: float) -> dict:
    """GB/s of the bytes moved, and on a GPU its share of the measured copy bandwidth (on a CPU the
    small copies run from cache, so a share of the DRAM copy bandwidth would be meaningless)."""
    out = {"copy_GB/s": moved / seconds / 1e9}
    if ctx.is_cuda:
        out["copy_%bw"] = 100 * moved / seconds / bandwidth
    return out


def _promote_rows(ctx: BenchContext, name: str, shape: tuple[int, int, int],
                  prefixes: tuple[int, ...], bandwidth: float) -> Iterator[dict]:
    layers, heads, head_dim = shape
    dev = ctx.device
    max_len = max(prefixes) + STEP
    cache = torch.zeros(layers, 2, K, heads, max_len, head_dim, dtype=DTYPE, device=dev)
    cache.normal_()
    lens = torch.zeros(K, dtype=torch.int32, device=dev)
    winners = torch.zeros(1, dtype=torch.int64, device=dev)
    groups = torch.arange(K, device=dev).view(1, K)
    start = torch.zeros(1, dtype=torch.int64, device=dev)
    siblings = torch.arange(1, K, device=dev)
    winner_rep = torch.zeros(K - 1, dtype=torch.int64, device=dev)
    iters = 5 if ctx.quick else 20
    # The baselines copy up to K x the prefix per call: fewer repeats in quick mode.
    slow = dict(warmup=1, iters=3) if ctx.quick else dict(warmup=2, iters=10)
    for prefix in prefixes:
        n = prefix + STEP
        lens.fill_(n)
        start.fill_(prefix)
        first = torch.full((K - 1,), prefix, dtype=torch.int64, device=dev)
        last = first + STEP
        t_ours = timeit(lambda: kv_promote(cache, lens, winners, groups, start), dev, iters=iters)
        t_copy = timeit(lambda: kv_copy_ranges(cache, winner_rep, siblings, first, last), dev, iters=iters)
        kv = KVCache(cache, lens)
        t_cache = timeit(lambda: kv.promote(winner_rep, siblings, first), dev, iters=iters)
        graphed = {"cache_promote_graph_us": time_graph(lambda: kv.promote(winner_rep, siblings,
                                                                           first), dev) * 1e6
                   } if ctx.is_cuda else {}

        used = cache[:, :, :, :, :n]
        t_index = timeit(lambda: used.index_copy_(2, siblings, used.index_select(2, winner_rep)), dev,
                         **slow)

        # The paper's running cache: per layer (K, V) of shape [1, n_kv, n, head_dim].
        running = [(cache[i, 0, 0, :, :n].clone()[None], cache[i, 1, 0, :, :n].clone()[None])
                   for i in range(layers)]
        reset_peak_memory(dev)
        base = peak_memory_bytes(dev)
        t_deep = timeit(lambda: [copy.deepcopy(running) for _ in range(K)], dev, **slow)
        peak = peak_memory_bytes(dev)

        moved = 2 * (K - 1) * STEP * _token_bytes(*shape)  # read + write
        row = {
            "case": "promote", "model": name, "tokens": prefix, "pairs": K - 1,
            "ours_us": t_ours * 1e6, "copy_us": t_copy * 1e6, "cache_promote_us": t_cache * 1e6,
            **graphed,
            "deepcopy_us": t_deep * 1e6, "index_copy_us": t_index * 1e6,
            "deepcopy/ours": t_deep / t_ours, "index_copy/ours": t_index / t_ours,
            **_bandwidth(ctx, moved, t_copy, bandwidth),
        }
        if peak is not None:
            row["deepcopy_extra_MB"] = (peak - base) / 2**20
        yield row


def _copy_ranges_rows(ctx: BenchContext, name: str, shape: tuple[int, int, int],
                      written_bytes: int, bandwidth: float) -> Iterator[dict]:
    """Many pairs of one range length each: src slot p -> dst slot P + p, tokens [0, R)."""
    dev = ctx.device
    layers, heads, head_dim = shape
    for length in RANGES:
        pairs = max(1, written_bytes // (length * _token_bytes(*shape)))
        cache = torch.empty(layers, 2, 2 * pairs, heads, length, head_dim, dtype=DTYPE, device=dev)
        cache.normal_()
        src = torch.arange(pairs, device=dev)
        dst = src + pairs
        first = torch.zeros(pairs, dtype=torch.int64, device=dev)
        last = torch.full((pairs,), length, dtype=torch.int64, device=dev)
        t = timeit(lambda: kv_copy_ranges(cache, src, dst, first, last), dev, iters=5 if ctx.quick else 20)
        moved = 2 * pairs * length * _token_bytes(*shape)
        yield {"case": "copy_ranges", "model": name, "tokens": length, "pairs": pairs,
               "copy_us": t * 1e6, **_bandwidth(ctx, moved, t, bandwidth)}


BEAMS, BEAM_K, PROMPT = 4, 4, 128
# survivors' candidate slots per beam (beam b's candidates are slots b*K .. b*K+K-1)
BEAM_CASES = {
    "kept": [b * BEAM_K + 1 for b in range(BEAMS)],
    "one_move": [1, 2, 2 * BEAM_K + 1, 3 * BEAM_K + 1],  # beam 1 continues from beam 0's slot 2
    "all_moved": list(range(BEAMS)),  # every survivor is a candidate of beam 0
}


def _beam_cache(layout_name: str, shape: tuple[int, int, int], max_len: int, dev: torch.device):
    """One request's caches in a layout, filled with random values (their lengths are set by
    `_beam_state`)."""
    layers, heads, head_dim = shape
    width = BEAMS * BEAM_K

    def kv(slots: int, length: int) -> KVCache:
        data = torch.empty(layers, 2, slots, heads, length, head_dim, dtype=DTYPE, device=dev)
        return KVCache(data.normal_(), torch.zeros(slots, dtype=torch.int32, device=dev))

    if layout_name == "fork":
        return ForkSlots(kv(width, max_len))
    return SharedPrefixSlots(SharedPrefixCache(kv(BEAMS, max_len), kv(width, STEP), BEAM_K))


def _beam_state(cache, prefix: int) -> None:
    """Every slot at the end of a step: ``prefix`` committed tokens plus a STEP-token candidate."""
    if isinstance(cache, ForkSlots):
        cache.storage.lens.fill_(prefix + STEP)
        cache.committed.fill_(prefix)
    else:
        cache.storage.prefix.lens.fill_(prefix)
        cache.storage.suffix.lens.fill_(STEP)
    cache.prompt.fill_(PROMPT)


def _beam_promote_rows(ctx: BenchContext, name: str, shape: tuple[int, int, int],
                       prefixes: tuple[int, ...]) -> Iterator[dict]:
    dev = ctx.device
    iters = 5 if ctx.quick else 20
    for layout_name in ("fork", "shared_prefix"):
        layout = slot_layout(layout_name, BEAM_K, STEP, beams=BEAMS)
        cache = _beam_cache(layout_name, shape, max(prefixes) + STEP, dev)
        for prefix in prefixes:
            row = {"case": "beam_promote", "model": name, "layout": layout_name,
                   "tokens": prefix, "beams": BEAMS, "k": BEAM_K}
            for case, sources in BEAM_CASES.items():
                index, sizes = layout.promote_index([sources], [0])
                args = layout.split_promote(index.to(dev), sizes)

                def step() -> None:  # the state reset is two fills, the same in every case
                    _beam_state(cache, prefix)
                    cache.promote(*args)

                row[f"{case}_us"] = timeit(step, dev, iters=iters) * 1e6
                row[f"{case}_moves"] = sizes[1] // BEAM_K
            row["one_move/kept"] = row["one_move_us"] / row["kept_us"]
            row["all_moved/kept"] = row["all_moved_us"] / row["kept_us"]
            yield row


def run(ctx: BenchContext) -> Iterator[dict]:
    """Yields each model's promote rows as they are measured, then the copy_ranges rows."""
    if ctx.is_cuda:
        prefixes = (256, 1024, 4096, 8192) if ctx.quick else (256, 512, 1024, 2048, 4096, 8192)
        models = MODELS
        written = (64 if ctx.quick else 256) * 2**20
    else:
        # CPU: the 0.5B shape only; quick stops at 4096 tokens (the deepcopy baseline alone moves
        # K x 50 MB per step there).
        prefixes = (256, 1024, 4096) if ctx.quick else (256, 512, 1024, 2048, 4096, 8192)
        models = {k: v for k, v in MODELS.items() if k == "Qwen2.5-0.5B"} if ctx.quick else MODELS
        written = (4 if ctx.quick else 32) * 2**20
    bandwidth = copy_bandwidth(ctx.device)
    ctx.note(f"model = that model's KV-cache shape (layers, KV heads, head_dim) filled with random "
             f"values; no checkpoint is loaded. K={K} candidates, step={STEP} tokens, bf16. "
             "ours_us = kv_promote (wrapper index ops + one copy launch); copy_us = the "
             "kv_copy_ranges launch alone; cache_promote_us = the engine's KVCache.promote (lengths gather "
             "+ copy + lengths scatter), cache_promote_graph_us the same replayed from a CUDA graph. "
             "copy_GB/s = bytes moved (read + write) per second of "
             "that row's copy.")
    if ctx.is_cuda:
        ctx.note(f"copy_%bw = copy_GB/s as a share of the measured device copy bandwidth "
                 f"({bandwidth / 1e9:.0f} GB/s, one large copy).")
    else:
        ctx.note(f"CPU: absolute times and GB/s mean little (shared cores). These copies are small "
                 f"enough to run from the CPU caches, so copy_GB/s can exceed the measured DRAM "
                 f"copy bandwidth ({bandwidth / 1e9:.0f} GB/s, one 64 MiB copy). The ratios and the "
                 "growth with the prefix are what carries over; GPU numbers need `--device cuda`.")
    for name, shape in models.items():
        ours = []
        for row in _promote_rows(ctx, name, shape, prefixes, bandwidth):
            ours.append(row["ours_us"])
            yield row
        ctx.note(f"{name}: ours at {prefixes[-1]} tokens / at {prefixes[0]} = {ours[-1] / ours[0]:.2f} "
                 "(flat = 1); deepcopy and index_copy grow with the prefix.")
    yield from _copy_ranges_rows(ctx, "Qwen2.5-0.5B", MODELS["Qwen2.5-0.5B"], written, bandwidth)
    beam_prefixes = tuple(p for p in prefixes if p > PROMPT)
    ctx.note(f"beam_promote: one request of {BEAMS} beams x {BEAM_K} candidates, a {PROMPT}-token "
             f"prompt, {STEP}-token steps; kept/one_move/all_moved: 0/1/{BEAMS - 1} beams continue "
             "from another beam's candidate (`*_moves`), each move copying the text generated "
             "since the prompt (fork: into every slot of the beam; shared_prefix: into its prefix "
             "once).")
    yield from _beam_promote_rows(ctx, "Qwen2.5-0.5B", MODELS["Qwen2.5-0.5B"], beam_prefixes)
