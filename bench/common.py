"""Shared benchmark plumbing: the run context, timing, memory peaks, device copy bandwidth, tables,
readable model names, and the transformers-version shims the sections share.

Every section module (``bench/<name>.py``) exposes ``run(ctx: BenchContext) -> list[dict]``; each
dict is one table row. Rows compare implementations side by side in one run and carry ratios; an
absolute time means something only on a GPU, with the card named (``ctx.device_name``).
"""
from __future__ import annotations

import gc
import inspect
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mahalo_engine.tiny import tiny_family


@dataclass
class BenchContext:
    device: torch.device
    quick: bool
    model_dir: Path | None = None  # the tiny default checkpoint, or --model
    large: bool = False  # on CPU too, the rows at real model shapes (always on CUDA)
    notes: list[str] = field(default_factory=list)  # printed under the section's table
    out: Path | None = None  # the run's JSON path: sections name their extra files after it
    no_cache: bool = False  # retrain cached artefacts (quality section)
    all_sections: bool = False  # run as part of the default section list (no --sections)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_name(self) -> str:
        if self.is_cuda:
            return torch.cuda.get_device_name(self.device)
        import platform

        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

    def note(self, text: str) -> None:
        self.notes.append(text)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, iters: int = 10,
           min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA events on GPU, perf_counter on CPU).

    On a GPU the events bracket the host work of ``fn`` too (checks, plans, allocations before its
    first launch show as idle device time): time kernels with ``time_graph``, and the launcher's
    host cost with ``host_time``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start_all) < min_time_s:
        if device.type == "cuda":
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 10 * max(iters, 1):
            break
    return statistics.median(times)


def time_graph(fn: Callable[[], object], device: torch.device, *, iters: int = 10,
               replays: int = 10) -> float:
    """Median GPU seconds per call of ``fn`` as the engine runs it: captured once in a CUDA graph
    (after two warm-up calls on a side stream) and replayed ``replays`` times back to back per
    sample, so no host work (argument checks, plans, allocations) sits between the events."""
    if device.type != "cuda":
        raise ValueError(f"time_graph needs a CUDA device, got {device}")
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    synchronize(device)
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / replays)
    del graph
    return statistics.median(times)


def host_time(fn: Callable[[], object], device: torch.device, *, warmup: int = 3,
              iters: int = 30) -> float:
    """Median host seconds one call of ``fn`` takes to return: its launcher's own CPU cost (checks,
    plans, allocations, launches), with the device work left to run asynchronously. On CPU every
    op runs inline, so this is the whole call there."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    synchronize(device)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset; None on CPU (not tracked by torch)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


_COPY_BW: dict[str, float] = {}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted), cached per device."""
    key = str(device)
    if key not in _COPY_BW:
        if device.type != "cuda":
            nbytes = min(nbytes, 1 << 26)
        n = nbytes // 4
        src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        t = timeit(lambda: dst.copy_(src), device, warmup=3, iters=20)
        _COPY_BW[key] = 2 * n * 4 / t
        del src, dst
    return _COPY_BW[key]


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def model_label(path: Path) -> str:
    """A readable name for a model directory: the built-in tiny checkpoints (whose directory is
    named by a hash of their recipe) as ``tiny-<family> (random init)``, others by their name."""
    family = tiny_family(path)
    return f"tiny-{family} (random init)" if family is not None else Path(path).name


def hf_cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in v5; use what this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
