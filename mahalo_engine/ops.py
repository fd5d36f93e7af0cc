"""Batched KV-cache copies for step search: ``kv_copy_ranges``, ``kv_fork``, ``kv_promote`` and
(between two caches of different slot lengths) ``kv_append_ranges`` / ``kv_append``.

Owns the Python face of the ``torch.ops.mahalo.*`` custom ops built from ``csrc/``: loading the
extension on first use (``load_extension``: the prebuilt ``mahalo_engine._C``, else a just-in-time
ninja build of ``csrc/`` into a cache directory; importing this module loads nothing), their fake
implementations for ``torch.compile`` (the paged ops' too), the wrappers and their optional
argument checks.

The cache is one tensor ``[L, 2, S, n_kv, T_max, head_dim]`` (``KVCache.data``) and ``lens`` its
int32 ``[S]`` lengths (``KVCache.lens``). With ``check=False`` (the default) nothing here reads
device data on the host: every call is legal inside CUDA graph capture and under ``torch.compile``.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

import torch

from mahalo_engine.utils.paths import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _jit_build_dir(with_cuda: bool) -> Path:
    root = os.environ.get("MAHALO_EXT_DIR") or cache_dir("torch_extensions")
    flavour = f"cu{torch.version.cuda}" if with_cuda else "cpu"
    return Path(root) / f"torch{torch.__version__.split('+')[0]}-{flavour}"


def _jit_build() -> Path:
    """Compile ``csrc/`` with ninja and load it; a compiler error propagates as RuntimeError."""
    from torch.utils import cpp_extension

    if not _CSRC.is_dir():
        raise ImportError(
            "mahalo_engine._C is not built and no csrc/ directory is next to the package "
            f"(looked in {_CSRC}) to compile it from; reinstall with "
            "`pip install --no-build-isolation -e .` from a source checkout"
        )
    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += sorted(str(p) for p in _CSRC.glob("*.cu"))
    build_dir = _jit_build_dir(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "mahalo_engine._C is not built; compiling %s just in time (%s) into %s",
        _CSRC, "C++ + CUDA" if with_cuda else "C++ only", build_dir,
    )
    cpp_extension.load(
        name="mahalo_engine_C",
        sources=sources,
        extra_cflags=["-O3"] + (["-DMAHALO_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=["-O3"],
        extra_include_paths=[str(_CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
    )
    return build_dir


def _import_or_build() -> str:
    """Register ``torch.ops.mahalo.*``; returns "prebuilt" or "jit" (how they were obtained)."""
    if os.environ.get("MAHALO_JIT_BUILD") != "1":
        try:
            module = importlib.import_module("mahalo_engine._C")
        except ModuleNotFoundError as e:
            if e.name != "mahalo_engine._C":
                raise
        else:
            path = Path(module.__file__)
            built = ["*.h", "*.cpp"] + (["*.cu"] if _has_cuda_kernel() else [])
            stale = sorted(p.name for pattern in built for p in _CSRC.glob(pattern)
                           if p.stat().st_mtime > path.stat().st_mtime)
            if stale:
                logger.warning("prebuilt %s is older than csrc/%s; rebuild with "
                               "`pip install --no-build-isolation --no-deps -e .`", path, stale)
            logger.info("mahalo ops: prebuilt extension %s", path)
            return "prebuilt"
    build_dir = _jit_build()
    logger.info("mahalo ops: just-in-time extension in %s", build_dir)
    return "jit"


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mahalo::kv_copy_ranges", "CUDA")


def _register_fakes() -> None:
    # The csrc ops work in place and return nothing, so a fake has nothing to describe beyond the
    # schema's mutation annotations: every such mahalo op without one (the Python-defined
    # multihead ops bring their own) gets it, so a new csrc op needs no edit here. register_fake
    # needs the op to exist: called after loading.
    for qualname in torch._C._dispatch_get_all_op_names():
        namespace, _, name = qualname.partition("::")
        if namespace != "mahalo" or torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            continue
        if getattr(torch.ops.mahalo, name).default._schema.returns:
            raise RuntimeError(f"{qualname} returns tensors: register its fake impl in {__name__}")
        torch.library.register_fake(qualname)(_fake_in_place)


def _fake_in_place(*args) -> None:
    return None


_LOAD_LOCK = threading.Lock()
_LOADED_FROM: str | None = None


# Under torch.compile, Dynamo runs this at trace time and keeps the result as a constant instead
# of tracing it: so compiling a wrapper before any eager call still loads the extension (and its
# fake impls) before the op is looked up, without a graph break.
@torch.compiler.assume_constant_result
def load_extension() -> str:
    """Load the extension if it is not loaded yet (registering ``torch.ops.mahalo.kv_*`` and their
    fake impls); returns how it was obtained: ``"prebuilt"`` (``mahalo_engine._C``) or ``"jit"``.

    Importing this module loads nothing: the wrappers below call this on first use. Call it yourself
    before using ``torch.ops.mahalo.kv_*`` directly.
    """
    global _LOADED_FROM
    if _LOADED_FROM is not None:
        return _LOADED_FROM
    with _LOAD_LOCK:
        if _LOADED_FROM is None:
            how = _import_or_build()
            _register_fakes()
            if torch.cuda.is_available() and not _has_cuda_kernel():
                logger.warning("mahalo ops were built without CUDA (loaded from %s): CUDA caches "
                               "will fail; rebuild where nvcc is found (CUDA_HOME)", how)
            _LOADED_FROM = how
    return _LOADED_FROM


def has_cuda_kernels() -> bool:
    """Whether the loaded extension has its CUDA kernels (loads it first)."""
    load_extension()
    return _has_cuda_kernel()


def kv_copy_ranges(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   start: torch.Tensor, end: torch.Tensor, *, check: bool = False) -> None:
    """For each pair p: ``cache[:, :, dst[p], :, start[p]:end[p]] = cache[:, :, src[p], :, start[p]:end[p]]``.

    One launch covers every layer, K and V, all kv heads and all pairs. ``src/dst/start/end`` are
    int32 or int64 ``[P]`` tensors (one dtype, any stride) on the cache's device. dst slots must be
    distinct and never a src slot. ``check=True`` validates everything (a host sync) and raises
    ``ValueError`` naming the offending pair; without it, a pair outside the cache is skipped by
    the kernels (they never write out of bounds) and metadata errors still raise ``ValueError``.
    """
    load_extension()
    if check:
        _check_copy_args(cache, src, dst, start, end)
    torch.ops.mahalo.kv_copy_ranges(cache, src, dst, start, end)


def kv_fork(cache: torch.Tensor, lens: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
            *, check: bool = False) -> None:
    """Copy ``[0, lens[src[p]])`` of slot ``src[p]`` into slot ``dst[p]``; set ``lens[dst[p]] = lens[src[p]]``.

    ``lens`` (int32 ``[S]``) is updated in place. The ranges are gathered on the device with torch
    index ops (fixed-size outputs, no host read), so the call is graph-safe.
    """
    if check:
        _check_lens(cache, lens)
        _check_index(cache, "src", src)
        _check_slots("src", src.tolist(), cache.shape[2], "pair")  # before lens[src] is gathered
    end = lens.index_select(0, src).to(src.dtype)
    kv_copy_ranges(cache, src, dst, torch.zeros_like(src), end, check=check)
    lens.index_copy_(0, dst.long(), end.to(lens.dtype))


def kv_promote(cache: torch.Tensor, lens: torch.Tensor, winners: torch.Tensor,
               groups: torch.Tensor, start: torch.Tensor, *, check: bool = False) -> None:
    """Make every slot of group g a copy of its winner: copy ``[start[g], lens[winners[g]])``.

    ``winners [G]``; ``groups [G, K]`` the K slots of each group, winner included; ``start [G]`` the
    group's committed length before the step (every slot of the group already holds ``[0,
    start[g])``). All of the group's ``lens`` become ``lens[winners[g]]`` (in place).

    Graph-safe: the G*K pairs are built on the device with fixed shapes; the winner's own pair
    gets the empty range ``[start, start)``, so it copies nothing.
    """
    load_extension()
    if check:
        _check_promote_args(cache, lens, winners, groups, start)
    num_groups, k = groups.shape
    src = winners.long()[:, None].expand(num_groups, k).reshape(-1)
    dst = groups.long().reshape(-1)
    first = start.long()[:, None].expand(num_groups, k).reshape(-1)
    new_len = lens.index_select(0, src)
    end = torch.where(dst == src, first, new_len.long())
    torch.ops.mahalo.kv_copy_ranges(cache, src, dst, first, end)
    lens.index_copy_(0, dst, new_len)


def kv_append_ranges(dst: torch.Tensor, src: torch.Tensor, src_slot: torch.Tensor,
                     dst_slot: torch.Tensor, dst_start: torch.Tensor, count: torch.Tensor,
                     *, check: bool = False) -> None:
    """For each pair p: ``dst[:, :, dst_slot[p], :, dst_start[p]:dst_start[p] + count[p]] =
    src[:, :, src_slot[p], :, :count[p]]`` (two caches ``[L, 2, S, n_kv, T, hd]`` sharing L, n_kv,
    hd and dtype; S and T may differ). One launch for every pair, layer, K/V and head.

    Index tensors: one int dtype, ``[P]``, on the caches' device. ``check=True`` validates the
    values (a host sync) and raises ``ValueError`` naming the pair; without it a pair outside
    either cache is skipped by the kernels (never written out of bounds). dst slots must be
    distinct.
    """
    load_extension()
    if check:
        _check_append_args(dst, src, src_slot, dst_slot, dst_start, count)
    torch.ops.mahalo.kv_append_ranges(dst, src, src_slot, dst_slot, dst_start, count)


def kv_append(dst: torch.Tensor, dst_lens: torch.Tensor, src: torch.Tensor,
              src_lens: torch.Tensor, src_slot: torch.Tensor, dst_slot: torch.Tensor, *,
              check: bool = False) -> None:
    """Append all ``src_lens[src_slot[p]]`` tokens of slot ``src_slot[p]`` of ``src`` to slot
    ``dst_slot[p]`` of ``dst`` (at ``dst_lens[dst_slot[p]]``); ``dst_lens`` grows in place.

    Graph-safe: counts and starts are gathered on the device with fixed shapes.
    """
    if check:
        _check_lens(dst, dst_lens)
        _check_lens(src, src_lens)
        _check_index(src, "src_slot", src_slot)
        _check_slots("src_slot", src_slot.tolist(), src.shape[2], "pair")
        _check_index(dst, "dst_slot", dst_slot)
        _check_slots("dst_slot", dst_slot.tolist(), dst.shape[2], "pair")
    count = src_lens.index_select(0, src_slot).to(src_slot.dtype)
    start = dst_lens.index_select(0, dst_slot).to(src_slot.dtype)
    kv_append_ranges(dst, src, src_slot, dst_slot.to(src_slot.dtype), start, count, check=check)
    dst_lens.index_add_(0, dst_slot, count.to(dst_lens.dtype))


# ---- checks (check=True only: they read index values on the host) ----

def _check_cache(cache: torch.Tensor) -> None:
    if not isinstance(cache, torch.Tensor):
        raise ValueError(f"cache must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"cache must be [L, 2, S, n_kv, T_max, head_dim], got shape {tuple(cache.shape)}")
    if cache.dtype not in _CACHE_DTYPES:
        raise ValueError(f"cache dtype must be float32, bfloat16 or float16, got {cache.dtype}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")


def _check_index(cache: torch.Tensor, name: str, t: torch.Tensor, dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != cache.device:
        raise ValueError(f"{name} is on {t.device} but cache is on {cache.device}")


def _check_slots(name: str, values: list[int], num_slots: int, what: str) -> None:
    for i, s in enumerate(values):
        if not 0 <= s < num_slots:
            raise ValueError(f"{what} {i}: {name} slot {s} is out of range [0, {num_slots})")


def _check_copy_args(cache, src, dst, start, end) -> None:
    _check_cache(cache)
    tensors = {"src": src, "dst": dst, "start": start, "end": end}
    for name, t in tensors.items():
        _check_index(cache, name, t)
        if t.dtype != src.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but src has {src.dtype}; all index tensors "
                             "must share one dtype")
        if t.numel() != src.numel():
            raise ValueError(f"{name} has {t.numel()} entries but src has {src.numel()}")
    num_slots, max_len = cache.shape[2], cache.shape[4]
    s, d, a, b = (t.tolist() for t in (src, dst, start, end))
    _check_slots("src", s, num_slots, "pair")
    _check_slots("dst", d, num_slots, "pair")
    for p in range(len(s)):
        if not 0 <= a[p] <= b[p] <= max_len:
            raise ValueError(f"pair {p}: range [{a[p]}, {b[p]}) must satisfy 0 <= start <= end <= "
                             f"T_max={max_len}")
    first_dst: dict[int, int] = {}
    for p, slot in enumerate(d):
        if slot in first_dst:
            raise ValueError(f"pair {p}: dst slot {slot} is also the dst of pair {first_dst[slot]}; "
                             "dst slots must be distinct")
        first_dst[slot] = p
    for p, slot in enumerate(s):
        if slot in first_dst:
            raise ValueError(f"pair {first_dst[slot]}: dst slot {slot} is also the src of pair {p}; "
                             "a dst slot must never be a src")


def _check_lens(cache: torch.Tensor, lens: torch.Tensor) -> None:
    _check_cache(cache)
    if not isinstance(lens, torch.Tensor) or lens.dtype != torch.int32:
        raise ValueError(f"lens must be an int32 tensor, got "
                         f"{lens.dtype if isinstance(lens, torch.Tensor) else type(lens).__name__}")
    if tuple(lens.shape) != (cache.shape[2],):
        raise ValueError(f"lens must have shape [S]=({cache.shape[2]},), got {tuple(lens.shape)}")
    if lens.device != cache.device:
        raise ValueError(f"lens is on {lens.device} but cache is on {cache.device}")


def _check_promote_args(cache, lens, winners, groups, start) -> None:
    _check_lens(cache, lens)
    _check_index(cache, "winners", winners)
    _check_index(cache, "groups", groups, dim=2)
    _check_index(cache, "start", start)
    num_groups = groups.shape[0]
    if winners.numel() != num_groups or start.numel() != num_groups:
        raise ValueError(f"groups has {num_groups} groups but winners has {winners.numel()} and start "
                         f"{start.numel()} entries; expected one per group")
    num_slots, max_len = cache.shape[2], cache.shape[4]
    w, a, g, n = winners.tolist(), start.tolist(), groups.tolist(), lens.tolist()
    _check_slots("winner", w, num_slots, "group")
    owner: dict[int, int] = {}
    for i, slots in enumerate(g):
        for slot in slots:
            if not 0 <= slot < num_slots:
                raise ValueError(f"group {i}: slot {slot} is out of range [0, {num_slots})")
        if slots.count(w[i]) != 1:
            raise ValueError(f"group {i}: winner slot {w[i]} must appear exactly once in its group "
                             f"{slots}")
        for slot in slots:
            if slot in owner:
                where = "twice in the group" if owner[slot] == i else f"also in group {owner[slot]}"
                raise ValueError(f"group {i}: slot {slot} appears {where}; slots must be distinct")
            owner[slot] = i
        if not 0 <= a[i] <= n[w[i]] <= max_len:
            raise ValueError(f"group {i}: start {a[i]} and winner length lens[{w[i]}]={n[w[i]]} must "
                             f"satisfy 0 <= start <= length <= T_max={max_len}")



def _check_append_args(dst, src, src_slot, dst_slot, dst_start, count) -> None:
    _check_cache(dst)
    _check_cache(src)
    names = {"src_slot": src_slot, "dst_slot": dst_slot, "dst_start": dst_start, "count": count}
    for name, t in names.items():
        _check_index(dst, name, t)
        if t.dtype != src_slot.dtype or t.numel() != src_slot.numel():
            raise ValueError(f"{name} ({t.dtype}, {t.numel()} entries) must match src_slot "
                             f"({src_slot.dtype}, {src_slot.numel()} entries)")
    s, d, a, n = (t.tolist() for t in (src_slot, dst_slot, dst_start, count))
    _check_slots("src", s, src.shape[2], "pair")
    _check_slots("dst", d, dst.shape[2], "pair")
    for p in range(len(s)):
        if not (0 <= n[p] <= src.shape[4] and 0 <= a[p] and a[p] + n[p] <= dst.shape[4]):
            raise ValueError(f"pair {p}: count {n[p]} at dst_start {a[p]} must satisfy 0 <= count "
                             f"<= src T={src.shape[4]} and dst_start + count <= dst T={dst.shape[4]}")
    if len(set(d)) != len(d):
        raise ValueError(f"dst slots {d} must be distinct")
