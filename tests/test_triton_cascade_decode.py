"""Cascade (shared-prefix) decode attention: the reference and the Triton kernel against float64
attention over the concatenated prefix + suffix K/V, computed per (request, candidate, head) with
plain loops. The kernel runs on CUDA, or in Triton's interpreter on CPU with TRITON_INTERPRET=1
(small shapes: the interpreter pays per program and per op)."""
import functools
import math
import os

import pytest
import torch

from far_views import far_suffix
from triton_kernels import cascade
from triton_kernels.cascade import cpu as cascade_cpu
from triton_kernels.reference import attend_partial, cascade_decode_attention, merge_partials

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 (CPU interpreter)")

# The Triton kernels by name: the op's own dispatch runs the CPU path on CPU tensors.
kernel_decode = functools.partial(cascade.cascade_decode_attention, backend="triton")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def poison_unused(pk, pv, sk, sv, plen, slen, poison: float) -> None:
    """Set every prefix position at or past ``plen[r]`` and suffix position at or past
    ``slen[r, c]`` to ``poison``, in place (a kernel must never read them)."""
    for i in range(pk.shape[0]):
        pk[i, :, int(plen[i]):] = poison
        pv[i, :, int(plen[i]):] = poison
        for c in range(sk.shape[1]):
            sk[i, c, :, int(slen[i, c]):] = poison
            sv[i, c, :, int(slen[i, c]):] = poison


def make_case(r, k, n_kv, g, hd, tp, ts, plens, slens, dtype=torch.float32, *, seed=0,
              poison=float("nan"), device="cpu"):
    """Random q / prefix / suffix with every unused cache position set to ``poison``."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(r, k, n_kv * g, hd, generator=gen)
    pk, pv = torch.randn(2, r, n_kv, tp, hd, generator=gen) * 2
    sk, sv = torch.randn(2, r, k, n_kv, ts, hd, generator=gen) * 2
    plen = torch.tensor(plens, dtype=torch.int32)
    slen = torch.tensor(slens, dtype=torch.int32).reshape(r, k)
    poison_unused(pk, pv, sk, sv, plen, slen, poison)
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), pk.to(**to), pv.to(**to), plen.to(device), sk.to(**to), sv.to(**to),
            slen.to(device))


def attention64(q, pk, pv, plen, sk, sv, slen):
    """float64 softmax attention of each candidate's query over cat(prefix[:plen], suffix[:slen])."""
    r, k, h, hd = q.shape
    n_kv = pk.shape[1]
    g = h // n_kv
    out = torch.zeros(r, k, h, hd, dtype=torch.float64)
    for i in range(r):
        for c in range(k):
            for head in range(h):
                kv = head // g
                keys = torch.cat((pk[i, kv, :plen[i]], sk[i, c, kv, :slen[i, c]])).double().cpu()
                vals = torch.cat((pv[i, kv, :plen[i]], sv[i, c, kv, :slen[i, c]])).double().cpu()
                if keys.shape[0] == 0:
                    continue
                p = torch.softmax(keys @ q[i, c, head].double().cpu() / math.sqrt(hd), dim=0)
                out[i, c, head] = p @ vals
    return out


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


# (R, K, n_kv, G, hd, Tp, Ts, prefix lens, suffix lens): GQA 1..8, head_dim 64/80/128,
# prefix 0 / 1 / odd / long, suffix 0..Ts (0 with a non-empty prefix and vice versa).
CASES = {
    "mha-hd64": (2, 3, 2, 1, 64, 40, 5, [0, 37], [1, 5, 3, 0, 2, 4]),
    "gqa2-hd80-prefix1": (1, 4, 2, 2, 80, 8, 6, [1], [0, 1, 6, 3]),
    "gqa4-hd128-odd": (2, 2, 1, 4, 128, 33, 4, [33, 17], [4, 1, 2, 3]),
    "gqa7-hd64-long": (1, 5, 1, 7, 64, 300, 3, [299], [1, 2, 3, 0, 3]),
    "gqa8-hd80-k1": (3, 1, 1, 8, 80, 20, 2, [0, 1, 19], [2, 1, 2]),
    "gqa3-hd64-empty-suffixes": (1, 3, 2, 3, 64, 9, 3, [9], [0, 0, 0]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_float64_over_concatenation(name, dtype):
    r, k, n_kv, g, hd, tp, ts, plens, slens = CASES[name]
    args = make_case(r, k, n_kv, g, hd, tp, ts, plens, slens, dtype, seed=len(name))
    out = cascade_decode_attention(*args)
    assert out.dtype == dtype
    assert_close(out, attention64(*args), dtype)


def test_merge_is_exact_when_one_side_is_empty():
    gen = torch.Generator().manual_seed(1)
    o = torch.randn(3, 4, 16, generator=gen)
    lse = torch.randn(3, 4, generator=gen)
    empty_o, empty_lse = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
    for merged, merged_lse in (merge_partials(o, lse, empty_o, empty_lse),
                               merge_partials(empty_o, empty_lse, o, lse)):
        assert torch.equal(merged, o) and torch.equal(merged_lse, lse)
    both, both_lse = merge_partials(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(both, empty_o) and torch.isneginf(both_lse).all()


def test_merge_equals_attention_over_the_union():
    """Splitting keys anywhere and merging gives the same as one softmax over all of them."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 3, 32, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 11, 32, generator=gen, dtype=torch.float64)
    full, lse_full = attend_partial(q, k, v, torch.tensor([11]), 0.2)
    a = attend_partial(q, k[:, :, :4], v[:, :, :4], torch.tensor([4]), 0.2)
    b = attend_partial(q, k[:, :, 4:], v[:, :, 4:], torch.tensor([7]), 0.2)
    merged, lse = merge_partials(*a, *b)
    torch.testing.assert_close(merged, full.to(merged.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse_full.to(lse.dtype), rtol=1e-6, atol=1e-6)


def test_poison_beyond_lengths_never_leaks():
    args = make_case(1, 2, 1, 2, 64, 12, 4, [5], [2, 3], poison=float("inf"))
    assert_close(cascade_decode_attention(*args), attention64(*args), torch.float32)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(1, 2, 3, 64)), "not a multiple"),
    (dict(prefix_lens=torch.zeros(2, dtype=torch.int32)), "prefix_lens must have shape"),
    (dict(suffix_lens=torch.zeros(1, 2)), "suffix_lens must be int32 or int64"),
    (dict(suffix_k=torch.zeros(1, 2, 3, 4, 64)), "suffix_k must be"),
])
def test_bad_arguments_are_named(bad, match):
    names = ["q", "prefix_k", "prefix_v", "prefix_lens", "suffix_k", "suffix_v", "suffix_lens"]
    args = dict(zip(names, make_case(1, 2, 2, 2, 64, 8, 4, [3], [1, 2])))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        cascade_decode_attention(**args)


# ---- Triton kernel -----------------------------------------------------------------------------

# CASES with a shorter long prefix (the interpreter is slow) that still spans several splits (chunk 32
# in the interpreter) and tiles, and the suffix crosses a 16-key tile.
KERNEL_CASES = {name: case for name, case in CASES.items() if name != "gqa7-hd64-long"}
KERNEL_CASES["gqa7-hd64-long-split"] = (1, 5, 1, 7, 64, 131, 19, [129], [1, 19, 17, 0, 3])


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_over_concatenation(name, dtype):
    r, k, n_kv, g, hd, tp, ts, plens, slens = KERNEL_CASES[name]
    args = make_case(r, k, n_kv, g, hd, tp, ts, plens, slens, dtype, seed=len(name) + 7,
                     device=DEVICE)
    out = kernel_decode(*args)
    assert out.dtype == dtype
    assert_close(out, attention64(*args), dtype)
    # Same function as the reference (fp32: up to summation order).
    if dtype == torch.float32:
        torch.testing.assert_close(out, cascade_decode_attention(*args), rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernel_reads_strided_cache_views_and_writes_out():
    """K/V as slices of slot caches ``[L, 2, S, n_kv, T, hd]`` (the engine's views), int32 lens
    slices, a prefix bound tighter than the cache, and a preallocated ``out``."""
    r, k, n_kv, g, hd = 2, 3, 2, 2, 64
    gen = torch.Generator().manual_seed(3)
    pcache = torch.randn(2, 2, r + 1, n_kv, 50, hd, generator=gen).to(DEVICE)
    scache = torch.randn(2, 2, (r + 1) * k, n_kv, 8, hd, generator=gen).to(DEVICE)
    plen = torch.tensor([7, 30, 0], dtype=torch.int32, device=DEVICE)[:r]
    slen = torch.tensor([1, 2, 3, 4, 5, 6, 0, 0, 0], dtype=torch.int32, device=DEVICE)[:r * k]
    q = torch.randn(r, k, n_kv * g, hd, generator=gen).to(DEVICE)
    pk, pv = pcache[1, 0, :r, :, :32], pcache[1, 1, :r, :, :32]  # bound 32 >= every plen
    sk = scache[1, 0, :r * k].view(r, k, n_kv, 8, hd)
    sv = scache[1, 1, :r * k].view(r, k, n_kv, 8, hd)
    out = torch.full_like(q, float("nan"))
    args = (q, pk, pv, plen, sk, sv, slen.view(r, k))
    assert kernel_decode(*args, out=out) is out
    assert_close(out, attention64(*args), torch.float32)


@needs_triton
def test_kernel_matches_reference_with_one_side_empty():
    """Empty suffixes (every candidate at step start) and an empty prefix: the merge passes the
    other side through."""
    for plens, slens in (([12], [0, 0]), ([0], [3, 1])):
        args = make_case(1, 2, 1, 2, 64, 12, 3, plens, slens, device=DEVICE)
        torch.testing.assert_close(kernel_decode(*args),
                                   cascade_decode_attention(*args), rtol=1e-5, atol=1e-5)


# Candidates 2**30 + 2**20 elements apart (a stride that fits int32): candidate 2's suffix starts
# past 2**31, as in a slot cache of K = 64 candidates · 32 KV heads · 8192 positions · 128 dims.
FAR_STRIDE = 2**30 + 2**20


@needs_triton
def test_kernel_candidate_offsets_past_int32():
    args = list(make_case(1, 3, 1, 2, 64, 8, 4, [5], [2, 3, 4], torch.float16, seed=5,
                          poison=0.0, device=DEVICE))
    args[4], args[5] = far_suffix(args[4], args[5], FAR_STRIDE)
    assert FAR_STRIDE < 2**31 <= 2 * args[4].stride(1)
    assert_close(kernel_decode(*args), attention64(*args), torch.float16)


def test_launch_config_splits_long_prefixes_on_gpu():
    """Few (request, KV head) pairs over a long prefix get many splits; a large batch gets one;
    chunks stay multiples of the key tile and cover the bound."""
    few = cascade.launch_config(1, 5, 2, 7, 64, 8192, torch.bfloat16, num_sms=132)
    many = cascade.launch_config(64, 5, 8, 4, 128, 8192, torch.bfloat16, num_sms=132)
    assert few.n_splits > 8 and many.n_splits == 1
    for cfg in (few, many):
        assert cfg.chunk % cfg.block_n == 0 and cfg.chunk * cfg.n_splits >= 8192
        assert cfg.chunk * (cfg.n_splits - 1) < 8192
    assert cascade.launch_config(1, 5, 2, 7, 64, 0, torch.float32, num_sms=132).n_splits == 0


# ---- the CPU fast path (torch's fused CPU flash attention per part) ----------------------------

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fast_path_matches_float64(name, dtype):
    r, k, n_kv, g, hd, tp, ts, plens, slens = CASES[name]
    # Finite stale values (the cache's contract: positions past a length hold stale K/V).
    args = make_case(r, k, n_kv, g, hd, tp, ts, plens, slens, dtype, seed=len(name) + 3,
                     poison=1e4)
    assert_close(cascade_cpu.cascade_decode_attention(*args), attention64(*args), dtype)


@pytest.mark.parametrize("op", ["decode", "extend"])
def test_op_dispatch_runs_the_cpu_path_on_cpu_tensors(op, monkeypatch):
    """The op decides its dispatch in its launcher: CPU tensors run the CPU path (also under
    TRITON_INTERPRET=1, where the Triton kernels run only when asked for by name)."""
    if op == "decode":
        args = make_case(1, 3, 2, 2, 16, 40, 4, [33], [1, 4, 2], poison=1e4)
        launch, cpu_path = cascade.cascade_decode_attention, cascade_cpu.cascade_decode_attention
    else:
        q, *rest = make_case(1, 3, 2, 2, 16, 40, 4, [33], [2, 4, 2], poison=1e4)
        args = (q[:, :, None].expand(1, 3, 2, 4, 16).contiguous(), *rest,
                torch.tensor([[2, 1, 2]], dtype=torch.int32))
        launch, cpu_path = cascade.cascade_extend_attention, cascade_cpu.cascade_extend_attention
    assert torch.equal(launch(*args), cpu_path(*args))
    assert torch.equal(launch(*args, backend="cpu"), cpu_path(*args))
    with pytest.raises(ValueError, match="backend must be None or one of"):
        launch(*args, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        launch(*args, backend="triton")


def capture_launch(launch, args: list, out: torch.Tensor) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``launch(*args, out=out)``, after one eager launch (which compiles the
    kernel outside the capture)."""
    launch(*args, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(*args, out=out)
    return graph


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph_with_new_lengths():
    """Lengths are read on the device: a captured launch follows lengths changed after capture
    (including a prefix growing into another split)."""
    r, k, n_kv, g, hd, tp, ts = 2, 4, 2, 7, 64, 600, 16
    args = list(make_case(r, k, n_kv, g, hd, tp, ts, [300, 17], [1, 2, 3, 4, 5, 6, 7, 8],
                          torch.bfloat16, poison=0.0, device="cuda"))
    out = torch.empty_like(args[0])
    graph = capture_launch(kernel_decode, args, out)
    args[3].copy_(torch.tensor([599, 1], dtype=torch.int32))
    args[6].copy_(torch.tensor([[16, 1, 9, 2], [3, 3, 3, 0]], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, attention64(*args), torch.bfloat16)
