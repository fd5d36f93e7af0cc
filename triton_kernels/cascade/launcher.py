"""Launchers of cascade (shared-prefix) attention: K candidates read their prefix once.

``cascade_decode_attention``: one new token per candidate (decode). ``cascade_extend_attention``:
a ragged run of new tokens per candidate (a PRM scoring the candidates' steps), causal over the
candidate's own suffix; its kernels cut the K·T·G query rows of a KV head into blocks.

Both have the signatures and semantics of ``triton_kernels.cascade.reference``. Device dispatch,
decided here only (`use_triton`): CUDA → the Triton kernels; CPU → the CPU path
``triton_kernels.cascade.cpu`` (torch's fused CPU attention), also under ``TRITON_INTERPRET=1``,
because the interpreter takes seconds per decode step of a model. The Triton kernels run on CPU
tensors, in the interpreter, only when a call asks for them by name (``backend="triton"``: the
kernel tests). The grid and the split of the prefix into chunks (split-K) depend only on
shapes: the prefix bound is ``prefix_k.shape[2]`` (pass a view ``[..., :kv_len, :]`` to bound it
tighter), and the true lengths are read on the device, so a launch never syncs with the host and
is legal inside CUDA-graph capture. Tile sizes come from ``launch_config`` (one small table,
never autotuned), which the sm_90 compile test uses too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from triton_kernels.cascade import cpu
from triton_kernels.cascade.kernels import (_cascade_extend_merge_kernel,
                                           _cascade_extend_partials_kernel, _cascade_merge_kernel,
                                           _cascade_partials_kernel)
from triton_kernels.checks import check_cascade, check_cascade_extend
from triton_kernels.device import DOT_PRECISION, interpreting, num_sms, upcast_dot

LOG2E = 1.4426950408889634
# A prefix chunk shorter than this costs more in partials and merging than it gains in programs.
MIN_CHUNK_GPU = 256
TARGET_PROGRAMS_PER_SM = 2
BACKENDS = ("triton", "cpu")


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """The cascade op's device dispatch: ``backend`` None → the Triton kernels on CUDA, the CPU
    path on CPU; ``"triton"`` / ``"cpu"`` → that one (Triton on CPU needs ``TRITON_INTERPRET=1``,
    the CPU path needs CPU tensors)."""
    if backend is None:
        return device.type == "cuda"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type == "cpu" and not interpreting():
        raise ValueError("backend='triton' on CPU tensors runs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before Triton is imported")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' takes CPU tensors, got {device}")
    return backend == "triton"


@dataclass(frozen=True)
class CascadeConfig:
    """Every launch parameter of one call (the sm_90 compile test builds the same ones)."""

    block_q: int  # prefix programs: K·G query rows of one KV head (≥ 16 for tensor-core dots)
    block_g: int  # suffix program: G query rows of one candidate
    block_d: int  # head_dim padded to a power of two
    block_n: int  # prefix keys per tile
    block_ns: int  # suffix keys per tile
    chunk: int  # prefix positions per split (a multiple of block_n)
    n_splits: int  # prefix splits (programs per (request, KV head), plus one for the suffixes)
    num_warps: int
    num_stages: int


def launch_config(r: int, k: int, n_kv: int, g: int, head_dim: int, max_prefix: int,
                  dtype: torch.dtype, *, num_sms: int | None) -> CascadeConfig:
    """Tiles for a GPU with ``num_sms`` SMs, or for the interpreter (``num_sms=None``).

    GPU: enough prefix splits that ``R·n_kv·(n_splits+1)`` programs fill every SM about twice,
    but never chunks under ``MIN_CHUNK_GPU`` positions. Interpreter: small key tiles and chunks of
    two tiles, so that tests with short prefixes still cross tile and split boundaries.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_q = max(16, triton.next_power_of_2(k * g))
    block_g = max(16, triton.next_power_of_2(g))
    if num_sms is None:
        block_n, block_ns, min_chunk, want = 16, 16, 32, 1
        num_warps = 4
    else:
        # The [block_q, block_d] fp32 accumulator and the K/V tiles must fit the registers without
        # spilling (tests/test_triton_cascade_compile.py): at most 64 × 128 elements per K/V tile, a
        # quarter of that for fp32 (its IEEE dots run on FMA units and hold operands in registers).
        tile_elems = 64 * 128 if dtype != torch.float32 else 16 * 128
        block_n = max(16, min(64, tile_elems // block_d))
        if block_q * block_d > 64 * 128:
            block_n = min(block_n, 32)
        block_ns = 16
        min_chunk, want = MIN_CHUNK_GPU, TARGET_PROGRAMS_PER_SM * num_sms
        # 8 warps once the query tile and a K/V tile together hold 96 × 128 elements: Triton
        # 3.6's ptxas spills at 4 there (Llama-3-8B shape, K = 8: 4 B), Triton 3.9's does not.
        num_warps = 4 if (block_q + block_n) * block_d < 96 * 128 else 8
    chunk, n_splits = _split_prefix(r * n_kv, max_prefix, block_n, min_chunk, want,
                                     interpreter=num_sms is None)
    return CascadeConfig(block_q, block_g, block_d, block_n, block_ns, chunk, n_splits,
                         num_warps, 2)


def _split_prefix(programs: int, max_prefix: int, block_n: int, min_chunk: int, want: int, *,
                  interpreter: bool) -> tuple[int, int]:
    """``(chunk, n_splits)``: enough splits that ``programs · n_splits`` reaches ``want`` (every
    split in the interpreter), chunks of at least ``min_chunk`` positions, multiples of
    ``block_n``, covering ``max_prefix``."""
    max_splits = triton.cdiv(max_prefix, min_chunk) if max_prefix > 0 else 0
    n_splits = max_splits if interpreter else \
        min(max_splits, max(1, triton.cdiv(want, max(1, programs))))
    chunk = block_n * triton.cdiv(triton.cdiv(max_prefix, max(1, n_splits)), block_n) \
        if n_splits else block_n
    return chunk, triton.cdiv(max_prefix, chunk)


def _check_strides(q: torch.Tensor, prefix_k, prefix_v, suffix_k, suffix_v, out) -> None:
    if q.stride(-1) != 1:
        raise ValueError(f"q must have a unit last stride, got strides {q.stride()}")
    for name, a, b in (("prefix", prefix_k, prefix_v), ("suffix", suffix_k, suffix_v)):
        if a.stride() != b.stride():
            raise ValueError(f"{name}_v strides {b.stride()} differ from {name}_k's {a.stride()}; "
                             "K and V must be views of one cache")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device \
            or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device} with a unit last "
                         f"stride, got {tuple(out.shape)} {out.dtype} on {out.device}")


def cascade_decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor, *,
                             scale: float | None = None, out: torch.Tensor | None = None,
                             config: CascadeConfig | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """Attention of one new token per candidate over its request's prefix and its own suffix.

    ``q [R, K, H, hd]``; ``prefix_k/v [R, n_kv, Tp, hd]`` (any strides with a unit last one, K
    and V with equal strides: views of one cache), ``prefix_lens`` int ``[R]`` (≤ Tp);
    ``suffix_k/v [R, K, n_kv, Ts, hd]``, ``suffix_lens`` int ``[R, K]`` (≤ Ts, the current token
    included). Returns ``[R, K, H, hd]`` in q's dtype (into ``out`` if given). Lengths are not
    validated (that would read them on the host): out-of-range values are the caller's bug.
    ``backend``: see `use_triton`; ``config`` applies to the Triton kernels only.
    """
    if not use_triton(q.device, backend):
        o = cpu.cascade_decode_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                         suffix_lens, scale=scale)
        return o if out is None else out.copy_(o)
    check_cascade(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens)
    out = torch.empty_like(q) if out is None else out
    _check_strides(q, prefix_k, prefix_v, suffix_k, suffix_v, out)
    r, k, h, hd = q.shape
    n_kv = prefix_k.shape[1]
    g = h // n_kv
    if config is None:
        config = launch_config(r, k, n_kv, g, hd, prefix_k.shape[2], q.dtype,
                               num_sms=num_sms(q.device) if q.is_cuda else None)
    scale = hd ** -0.5 if scale is None else scale
    n_parts = config.n_splits + 1
    part_o = torch.empty(r * n_kv, n_parts, k * g, hd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(r * n_kv, n_parts, k * g, dtype=torch.float32, device=q.device)
    upcast = upcast_dot(q.device, q.dtype)
    _cascade_partials_kernel[(r * n_kv, n_parts)](
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, part_o, part_lse,
        n_kv, k, config.chunk, config.n_splits, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2), suffix_k.stride(3),
        prefix_lens.stride(0), suffix_lens.stride(0), suffix_lens.stride(1),
        G=g, HEAD_DIM=hd, BLOCK_D=config.block_d, BLOCK_Q=config.block_q,
        BLOCK_G=config.block_g, BLOCK_N=config.block_n, BLOCK_NS=config.block_ns,
        DOT_PRECISION=DOT_PRECISION, UPCAST_DOT=upcast, num_warps=config.num_warps,
        num_stages=config.num_stages)
    _cascade_merge_kernel[(r * n_kv,)](
        part_o, part_lse, out, n_kv, k, n_parts, out.stride(0), out.stride(1), out.stride(2),
        G=g, HEAD_DIM=hd, BLOCK_D=config.block_d, BLOCK_Q=config.block_q,
        num_warps=config.num_warps)
    return out


@dataclass(frozen=True)
class ExtendConfig:
    """Every launch parameter of one extend call (the sm_90 compile test builds the same ones)."""

    block_q: int  # query rows per program, of the K·T·G rows of a (request, KV head)
    block_d: int
    block_n: int  # prefix keys per tile
    block_ns: int  # suffix keys per tile
    chunk: int
    n_splits: int
    num_warps: int
    num_stages: int
    merge_warps: int

    def row_blocks(self, k: int, t: int, g: int) -> int:
        return triton.cdiv(k * t * g, self.block_q)


def extend_launch_config(r: int, k: int, t: int, n_kv: int, g: int, head_dim: int,
                         max_prefix: int, dtype: torch.dtype, *, num_sms: int | None
                         ) -> ExtendConfig:
    """Tiles for the extend kernels (``num_sms=None``: the interpreter). Rows come in blocks of at
    most 64 (16 in the interpreter, so that tests cross row blocks and candidates inside one);
    key tiles as in `launch_config` for that many rows; splits fill the GPU counting every
    (request, KV head, row block) program."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    rows = k * t * g
    if num_sms is None:
        block_q, block_n, block_ns, min_chunk, want, num_warps = 16, 16, 16, 32, 1, 4
    else:
        block_q = min(64, max(16, triton.next_power_of_2(rows)))
        tile_elems = 64 * 128 if dtype != torch.float32 else 16 * 128  # see launch_config
        if dtype == torch.float32:  # fp32 operands live in registers: 64×128 rows spilled 2.5 KB
            block_q = min(block_q, max(16, 32 * 128 // block_d))
        block_n = max(16, min(64, tile_elems // block_d))
        block_ns = 16
        min_chunk, want = MIN_CHUNK_GPU, TARGET_PROGRAMS_PER_SM * num_sms
        num_warps = 4
    # The merge holds two fp32 [block_q, block_d] tiles: Triton 3.6's ptxas spilled 4 B at
    # 32×128 with 4 warps (and the partials kernel 8 B at 16×128), so wide fp32 merges get 8.
    merge_warps = 8 if num_sms is not None and dtype == torch.float32 \
        and block_q * block_d >= 32 * 128 else num_warps
    programs = r * n_kv * triton.cdiv(rows, block_q)
    chunk, n_splits = _split_prefix(programs, max_prefix, block_n, min_chunk, want,
                                    interpreter=num_sms is None)
    return ExtendConfig(block_q, block_d, block_n, block_ns, chunk, n_splits, num_warps, 2,
                        merge_warps)


def cascade_extend_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor,
                             num_new: torch.Tensor, *, scale: float | None = None,
                             out: torch.Tensor | None = None,
                             config: ExtendConfig | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """Ragged new tokens per candidate over its request's prefix and, causally, its own suffix.

    ``q [R, K, T, H, hd]``; ``prefix_k/v [R, n_kv, Tp, hd]`` (K and V views of one cache),
    ``prefix_lens [R]`` (≤ Tp); ``suffix_k/v [R, K, n_kv, Ts, hd]``, ``suffix_lens [R, K]`` (≤ Ts,
    the new tokens included), ``num_new [R, K]`` (≤ T, ≤ suffix_lens). Semantics of
    ``triton_kernels.cascade.reference.cascade_extend_attention`` (0 at padded tokens). Lengths
    are read on the device, never validated on the host; the grid depends on shapes only.
    ``backend``: see `use_triton`; ``config`` applies to the Triton kernels only.
    """
    if not use_triton(q.device, backend):
        o = cpu.cascade_extend_attention(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                                         suffix_lens, num_new, scale=scale)
        return o if out is None else out.copy_(o)
    check_cascade_extend(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                         num_new)
    out = torch.empty_like(q) if out is None else out
    _check_strides(q, prefix_k, prefix_v, suffix_k, suffix_v, out)
    r, k, t, h, hd = q.shape
    n_kv = prefix_k.shape[1]
    g = h // n_kv
    if config is None:
        config = extend_launch_config(r, k, t, n_kv, g, hd, prefix_k.shape[2], q.dtype,
                                      num_sms=num_sms(q.device) if q.is_cuda else None)
    scale = hd ** -0.5 if scale is None else scale
    n_parts = config.n_splits + 1
    blocks = config.row_blocks(k, t, g)
    part_o = torch.empty(r * n_kv, n_parts, k * t * g, hd, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(r * n_kv, n_parts, k * t * g, dtype=torch.float32, device=q.device)
    upcast = upcast_dot(q.device, q.dtype)
    _cascade_extend_partials_kernel[(r * n_kv, blocks, n_parts)](
        q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens, num_new, part_o,
        part_lse, n_kv, k, t, config.chunk, config.n_splits, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2), suffix_k.stride(3),
        prefix_lens.stride(0), suffix_lens.stride(0), suffix_lens.stride(1),
        num_new.stride(0), num_new.stride(1),
        G=g, HEAD_DIM=hd, BLOCK_D=config.block_d, BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n, BLOCK_NS=config.block_ns, DOT_PRECISION=DOT_PRECISION,
        UPCAST_DOT=upcast, num_warps=config.num_warps, num_stages=config.num_stages)
    _cascade_extend_merge_kernel[(r * n_kv, blocks)](
        part_o, part_lse, num_new, out, n_kv, k, t, n_parts,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        num_new.stride(0), num_new.stride(1),
        G=g, HEAD_DIM=hd, BLOCK_D=config.block_d, BLOCK_Q=config.block_q,
        num_warps=config.merge_warps)
    return out
