"""mahalo_engine.ops: kv_copy_ranges / kv_fork / kv_promote against a pure-torch loop reference.

CPU tests run the C++ kernel; `gpu` tests run the CUDA kernel (also inside a CUDAGraph). The cache
is filled with random values and every destination slot with a poison value first, so comparing the
whole tensor to the reference also proves untouched slots and positions kept their bits.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mahalo_engine import ops

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]
POISON = -777.0


# ---- reference and helpers ----

def ref_copy_ranges(cache, src, dst, start, end):
    out = cache.clone()
    for s, d, a, b in zip(src.tolist(), dst.tolist(), start.tolist(), end.tolist()):
        out[:, :, d, :, a:b] = cache[:, :, s, :, a:b]
    return out


def ref_fork(cache, lens, src, dst):
    out, new_lens = cache.clone(), lens.clone()
    for s, d in zip(src.tolist(), dst.tolist()):
        n = int(lens[s])
        out[:, :, d, :, :n] = cache[:, :, s, :, :n]
        new_lens[d] = n
    return out, new_lens


def ref_promote(cache, lens, winners, groups, start):
    out, new_lens = cache.clone(), lens.clone()
    for w, slots, a in zip(winners.tolist(), groups.tolist(), start.tolist()):
        n = int(lens[w])
        for s in slots:
            out[:, :, s, :, a:n] = cache[:, :, w, :, a:n]
            new_lens[s] = n
    return out, new_lens


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so that equality is exact (and -0.0 / NaN payloads count)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    diff = (bits(actual) != bits(expected)).nonzero()
    assert diff.numel() == 0, f"{diff.shape[0]} elements differ, first at index {diff[0].tolist()}"


def make_cache(shape, dtype, device="cpu", poison_slots=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(shape, generator=g).to(dtype)
    for s in poison_slots:
        cache[:, :, s] = POISON
    return cache.to(device)


def random_pairs(num_slots, max_len, num_pairs, seed, index_dtype, device="cpu"):
    """Ragged pairs with distinct dst slots never used as src; includes empty and T_max-touching ranges."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_slots, generator=g)
    dst = perm[:num_pairs]
    sources = perm[num_pairs:]
    src = sources[torch.randint(len(sources), (num_pairs,), generator=g)]
    a = torch.randint(0, max_len + 1, (num_pairs,), generator=g)
    b = torch.randint(0, max_len + 1, (num_pairs,), generator=g)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    start[0], end[0] = 3, 3                      # empty range
    start[1], end[1] = max_len - 5, max_len      # touches T_max
    start[2], end[2] = 0, max_len                # the whole slot
    return tuple(t.to(index_dtype).to(device) for t in (src, dst, start, end))


def idx(*values, dtype=torch.int64, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


# ---- kv_copy_ranges ----

def test_prebuilt_extension_is_used():
    if os.environ.get("MAHALO_JIT_BUILD") == "1":
        pytest.skip("MAHALO_JIT_BUILD=1 forces the just-in-time build")
    assert ops.load_extension() == "prebuilt", "pip install -e . should have built mahalo_engine._C"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("head_dim", [8, 3])
def test_copy_ranges_matches_reference(dtype, index_dtype, head_dim):
    shape = (3, 2, 12, 2, 17, head_dim)
    pairs = random_pairs(12, 17, 5, seed=head_dim, index_dtype=index_dtype)
    cache = make_cache(shape, dtype, poison_slots=pairs[1].tolist())
    expected = ref_copy_ranges(cache, *pairs)
    ops.kv_copy_ranges(cache, *pairs, check=True)
    assert_same(cache, expected)


def test_copy_ranges_many_pairs_parallel_path():
    # > 256 KiB in total: the CPU kernel splits (pair, row) items across threads.
    shape = (4, 2, 64, 2, 128, 64)
    pairs = random_pairs(64, 128, 30, seed=7, index_dtype=torch.int64)
    cache = make_cache(shape, torch.float32, poison_slots=pairs[1].tolist())
    expected = ref_copy_ranges(cache, *pairs)
    ops.kv_copy_ranges(cache, *pairs)
    assert_same(cache, expected)


def test_copy_ranges_strided_and_broadcast_indices():
    # Index tensors are read with their strides: a stride-0 broadcast src and a strided dst work
    # without copies.
    cache = make_cache((2, 2, 8, 1, 10, 4), torch.float32, poison_slots=(2, 4, 6))
    src = idx(1).expand(3)
    dst = idx(2, 9, 4, 9, 6)[::2]
    start, end = idx(0, 2, 4), idx(5, 10, 4)
    assert src.stride(0) == 0 and dst.stride(0) == 2
    expected = ref_copy_ranges(cache, src, dst, start, end)
    ops.kv_copy_ranges(cache, src, dst, start, end, check=True)
    assert_same(cache, expected)


def test_copy_ranges_no_pairs_is_a_no_op():
    cache = make_cache((1, 2, 3, 1, 4, 2), torch.float32)
    before = cache.clone()
    empty = torch.empty(0, dtype=torch.int64)
    ops.kv_copy_ranges(cache, empty, empty, empty, empty, check=True)
    assert_same(cache, before)


def test_unchecked_out_of_cache_pairs_are_skipped():
    # Without check=True, a pair outside the cache must not write anywhere (memory safety); the
    # valid pairs of the same call are still copied.
    cache = make_cache((2, 2, 6, 1, 8, 4), torch.float32, poison_slots=(3, 4, 5))
    src, dst = idx(0, 1, 2, 0), idx(3, 4, 5, 9)
    start, end = idx(0, 2, -1, 0), idx(8, 9, 4, 2)
    expected = ref_copy_ranges(cache, src[:1], dst[:1], start[:1], end[:1])
    ops.kv_copy_ranges(cache, src, dst, start, end)
    assert_same(cache, expected)


def _copy_args():
    cache = make_cache((2, 2, 6, 1, 8, 4), torch.float32)
    return cache, idx(0, 1), idx(2, 3), idx(0, 2), idx(4, 8)


@pytest.mark.parametrize("change, message", [
    (lambda a: {"src": idx(0, 6)}, r"pair 1: src slot 6 is out of range \[0, 6\)"),
    (lambda a: {"src": idx(-1, 1)}, r"pair 0: src slot -1 is out of range"),
    (lambda a: {"dst": idx(2, 7)}, r"pair 1: dst slot 7 is out of range"),
    (lambda a: {"start": idx(-1, 2)}, r"pair 0: range \[-1, 4\)"),
    (lambda a: {"start": idx(0, 5), "end": idx(4, 3)}, r"pair 1: range \[5, 3\)"),
    (lambda a: {"end": idx(4, 9)}, r"pair 1: range \[2, 9\) must satisfy 0 <= start <= end <= T_max=8"),
    (lambda a: {"dst": idx(2, 2)}, r"pair 1: dst slot 2 is also the dst of pair 0"),
    (lambda a: {"dst": idx(1, 3)}, r"pair 0: dst slot 1 is also the src of pair 1"),
    (lambda a: {"src": idx(0, 1, dtype=torch.int32)}, r"dst has dtype torch.int64 but src has torch.int32"),
    (lambda a: {"start": idx(0, 2).float()}, r"start must be int32 or int64, got torch.float32"),
    (lambda a: {"end": idx(4, 8, 8)}, r"end has 3 entries but src has 2"),
    (lambda a: {"dst": idx(2, 3).view(1, 2)}, r"dst must be 1-D, got shape \(1, 2\)"),
    (lambda a: {"src": idx(0, 1, device="meta")}, r"src is on meta but cache is on cpu"),
    (lambda a: {"cache": a["cache"][:, :1]}, r"cache must be \[L, 2, S, n_kv, T_max, head_dim\]"),
    (lambda a: {"cache": a["cache"].double()}, r"cache dtype must be float32, bfloat16 or float16"),
    (lambda a: {"cache": a["cache"].transpose(4, 5).contiguous().transpose(4, 5)}, r"cache must be contiguous"),
    (lambda a: {"src": [0, 1]}, r"src must be a torch.Tensor, got list"),
])
def test_check_rejects_bad_input(change, message):
    cache, src, dst, start, end = _copy_args()
    args = {"cache": cache, "src": src, "dst": dst, "start": start, "end": end}
    args.update(change(args))
    before = args["cache"].clone()
    with pytest.raises(ValueError, match=message):
        ops.kv_copy_ranges(args["cache"], args["src"], args["dst"], args["start"], args["end"], check=True)
    assert_same(args["cache"], before)


@pytest.mark.parametrize("change, message", [
    (lambda a: {"src": idx(0, 1, dtype=torch.int32)}, r"all index tensors must share one dtype"),
    (lambda a: {"end": idx(4, 8, 8)}, r"end has 3 entries but src has 2"),
    (lambda a: {"dst": idx(2, 3).view(1, 2)}, r"dst must be 1-D"),
    (lambda a: {"cache": a["cache"].double()}, r"cache dtype must be float32, bfloat16 or float16"),
    (lambda a: {"cache": a["cache"][:, :1]}, r"cache must be \[L, 2, S, n_kv, T_max, head_dim\]"),
    (lambda a: {"cache": a["cache"].transpose(4, 5).contiguous().transpose(4, 5)}, r"cache must be contiguous"),
])
def test_op_metadata_errors_raise_without_check(change, message):
    # The op itself checks metadata (free: no data read) and raises ValueError from C++.
    cache, src, dst, start, end = _copy_args()
    args = {"cache": cache, "src": src, "dst": dst, "start": start, "end": end}
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        ops.kv_copy_ranges(args["cache"], args["src"], args["dst"], args["start"], args["end"])


def test_opcheck_schema_fake_and_functionalization():
    ops.load_extension()  # torch.ops.mahalo.* exist once the extension is loaded
    cache, src, dst, start, end = _copy_args()
    results = torch.library.opcheck(torch.ops.mahalo.kv_copy_ranges.default, (cache, src, dst, start, end))
    assert all(v == "SUCCESS" for v in results.values()), results


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    ops.load_extension()  # the step calls torch.ops.mahalo.* directly

    def step(cache, src, dst, start, end):
        torch.ops.mahalo.kv_copy_ranges(cache, src, dst, start, end)
        return cache[:, :, dst].sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    pairs = random_pairs(10, 12, 4, seed=3, index_dtype=torch.int64)
    cache = make_cache((2, 2, 10, 2, 12, 4), torch.float32, poison_slots=pairs[1].tolist())
    expected = ref_copy_ranges(cache, *pairs)
    total = compiled(cache, *pairs)
    assert_same(cache, expected)
    assert torch.equal(total, expected[:, :, pairs[1]].sum())


# ---- kv_fork / kv_promote ----

@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_fork_copies_prefix_and_lens(index_dtype):
    cache = make_cache((2, 2, 7, 2, 16, 4), torch.bfloat16, poison_slots=(2, 3, 5))
    lens = torch.tensor([9, 16, 1, 4, 3, 0, 2], dtype=torch.int32)
    src, dst = idx(0, 1, 0, dtype=index_dtype), idx(2, 3, 5, dtype=index_dtype)
    expected, expected_lens = ref_fork(cache, lens, src, dst)
    ops.kv_fork(cache, lens, src, dst, check=True)
    assert_same(cache, expected)
    assert torch.equal(lens, expected_lens)
    assert lens.tolist() == [9, 16, 9, 16, 3, 9, 2]


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_promote_copies_step_into_siblings_and_lens(index_dtype):
    # Two groups of K=3; the winner sits in a different column of each group; siblings diverged
    # after their committed length `start` and have different lengths (shorter and longer).
    cache = make_cache((2, 2, 8, 2, 20, 4), torch.float16, poison_slots=(0, 1, 2, 4, 6, 7))
    lens = torch.tensor([12, 15, 9, 7, 13, 5, 20, 8], dtype=torch.int32)
    winners = idx(3, 5, dtype=index_dtype)
    groups = idx(0, 3, 1, 5, 7, 6, dtype=index_dtype).view(2, 3)
    start = idx(4, 2, dtype=index_dtype)
    expected, expected_lens = ref_promote(cache, lens, winners, groups, start)
    ops.kv_promote(cache, lens, winners, groups, start, check=True)
    assert_same(cache, expected)
    assert torch.equal(lens, expected_lens)
    assert lens.tolist() == [7, 7, 9, 7, 13, 5, 5, 5]


def test_promote_single_group_uses_broadcast_pairs():
    # G=1: the (G*K) src/start vectors are stride-0 views; the kernels read them in place.
    cache = make_cache((3, 2, 5, 1, 40, 8), torch.float32, poison_slots=(0, 1, 3, 4))
    lens = torch.tensor([33, 35, 40, 34, 38], dtype=torch.int32)
    winners, groups, start = idx(2), idx(0, 1, 2, 3, 4).view(1, 5), idx(32)
    expected, expected_lens = ref_promote(cache, lens, winners, groups, start)
    ops.kv_promote(cache, lens, winners, groups, start)
    assert_same(cache, expected)
    assert torch.equal(lens, expected_lens)


def test_fork_and_promote_compile_fullgraph():
    # fullgraph=True fails on any host read (.item(), .tolist()) or data-dependent shape: this is
    # the graph-safety check on CPU.
    torch._dynamo.reset()
    fork = torch.compile(ops.kv_fork, backend="aot_eager", fullgraph=True)
    promote = torch.compile(ops.kv_promote, backend="aot_eager", fullgraph=True)
    cache = make_cache((2, 2, 6, 1, 12, 4), torch.float32, poison_slots=(1, 2, 4))
    lens = torch.tensor([5, 0, 0, 0, 0, 0], dtype=torch.int32)
    ref_cache, ref_lens = ref_fork(cache, lens, idx(0, 0), idx(1, 2))
    fork(cache, lens, idx(0, 0), idx(1, 2))
    assert_same(cache, ref_cache)
    assert torch.equal(lens, ref_lens)
    lens[:3] = torch.tensor([8, 10, 7], dtype=torch.int32)  # the three candidates decoded a step
    ref_cache, ref_lens = ref_promote(cache, lens, idx(1), idx(0, 1, 2).view(1, 3), idx(5))
    promote(cache, lens, idx(1), idx(0, 1, 2).view(1, 3), idx(5))
    assert_same(cache, ref_cache)
    assert torch.equal(lens, ref_lens)


def _fork_args():
    cache = make_cache((2, 2, 6, 1, 8, 4), torch.float32)
    return cache, torch.tensor([5, 8, 0, 0, 0, 0], dtype=torch.int32), idx(0, 1), idx(2, 3)


@pytest.mark.parametrize("change, message", [
    (lambda a: {"lens": a["lens"].long()}, r"lens must be an int32 tensor, got torch.int64"),
    (lambda a: {"lens": a["lens"][:4]}, r"lens must have shape \[S\]=\(6,\), got \(4,\)"),
    (lambda a: {"src": idx(0, 6)}, r"pair 1: src slot 6 is out of range"),
    (lambda a: {"dst": idx(2, 0)}, r"pair 1: dst slot 0 is also the src of pair 0"),
    (lambda a: {"dst": idx(2, 9)}, r"pair 1: dst slot 9 is out of range"),
    (lambda a: {"lens": torch.tensor([5, 9, 0, 0, 0, 0], dtype=torch.int32)}, r"pair 1: range \[0, 9\)"),
])
def test_fork_check_rejects_bad_input(change, message):
    cache, lens, src, dst = _fork_args()
    args = {"cache": cache, "lens": lens, "src": src, "dst": dst}
    args.update(change(args))
    before, lens_before = args["cache"].clone(), args["lens"].clone()
    with pytest.raises(ValueError, match=message):
        ops.kv_fork(args["cache"], args["lens"], args["src"], args["dst"], check=True)
    assert_same(args["cache"], before)
    assert torch.equal(args["lens"], lens_before)


def _promote_args():
    cache = make_cache((2, 2, 6, 1, 8, 4), torch.float32)
    lens = torch.tensor([6, 7, 5, 3, 4, 8], dtype=torch.int32)
    return cache, lens, idx(1, 5), idx(0, 1, 2, 3, 4, 5).view(2, 3), idx(3, 2)


@pytest.mark.parametrize("change, message", [
    (lambda a: {"winners": idx(3, 5)}, r"group 0: winner slot 3 must appear exactly once in its group \[0, 1, 2\]"),
    (lambda a: {"groups": idx(0, 1, 1, 3, 4, 5).view(2, 3)}, r"group 0: winner slot 1 must appear exactly once"),
    (lambda a: {"groups": idx(0, 1, 2, 2, 4, 5).view(2, 3)}, r"group 1: slot 2 appears also in group 0"),
    (lambda a: {"groups": idx(0, 1, 2, 3, 4, 4).view(2, 3), "winners": idx(1, 3)}, r"group 1: slot 4 appears twice in the group"),
    (lambda a: {"groups": idx(0, 1, 2, 3, 4, 6).view(2, 3)}, r"group 1: slot 6 is out of range \[0, 6\)"),
    (lambda a: {"winners": idx(1, 9)}, r"group 1: winner slot 9 is out of range"),
    (lambda a: {"start": idx(8, 2)}, r"group 0: start 8 and winner length lens\[1\]=7"),
    (lambda a: {"start": idx(3, -1)}, r"group 1: start -1"),
    (lambda a: {"lens": torch.tensor([6, 7, 5, 3, 4, 9], dtype=torch.int32)}, r"group 1: .* lens\[5\]=9 .*T_max=8"),
    (lambda a: {"start": idx(3, 2, 0)}, r"groups has 2 groups but winners has 2 and start 3 entries"),
    (lambda a: {"groups": idx(0, 1, 2, 3, 4, 5)}, r"groups must be 2-D, got shape \(6,\)"),
    (lambda a: {"lens": a["lens"].long()}, r"lens must be an int32 tensor"),
])
def test_promote_check_rejects_bad_input(change, message):
    cache, lens, winners, groups, start = _promote_args()
    args = {"cache": cache, "lens": lens, "winners": winners, "groups": groups, "start": start}
    args.update(change(args))
    before, lens_before = args["cache"].clone(), args["lens"].clone()
    with pytest.raises(ValueError, match=message):
        ops.kv_promote(args["cache"], args["lens"], args["winners"], args["groups"], args["start"], check=True)
    assert_same(args["cache"], before)
    assert torch.equal(args["lens"], lens_before)


# ---- the just-in-time build path ----

_JIT_SCRIPT = """
import torch
import mahalo_engine.ops as ops
assert ops.load_extension() == "jit", ops.load_extension()
cache = torch.arange(2 * 2 * 4 * 1 * 6 * 2, dtype=torch.float32).view(2, 2, 4, 1, 6, 2)
expected = cache.clone()
expected[:, :, 3, :, 1:5] = cache[:, :, 0, :, 1:5]
i = lambda *v: torch.tensor(v, dtype=torch.int32)
ops.kv_copy_ranges(cache, i(0), i(3), i(1), i(5), check=True)
assert torch.equal(cache, expected)
print("jit ok")
"""


def test_jit_build_compiles_and_runs(tmp_path):
    """MAHALO_JIT_BUILD=1 compiles csrc/ with ninja into MAHALO_EXT_DIR (~30-60 s on 2 cores)."""
    env = dict(os.environ, MAHALO_JIT_BUILD="1", MAHALO_EXT_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", _JIT_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "jit ok" in proc.stdout
    assert "compiling" in proc.stderr  # the one-time warning says which path was taken
    assert list(tmp_path.rglob("*.so")), "no compiled library in the cache directory"


# ---- CUDA ----

def _cuda_cases():
    # (head_dim, dtype, offset elements): 16/8/4/2-byte vector paths and a misaligned base pointer.
    return [(64, torch.bfloat16, 0), (128, torch.float32, 0), (4, torch.float16, 0),
            (1, torch.float32, 0), (1, torch.bfloat16, 0), (64, torch.float16, 1), (3, torch.float32, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim, dtype, offset", _cuda_cases())
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_cuda_copy_ranges_matches_reference(head_dim, dtype, offset, index_dtype):
    shape = (3, 2, 24, 2, 70, head_dim)
    pairs = random_pairs(24, 70, 9, seed=head_dim + offset, index_dtype=index_dtype, device="cuda")
    host = make_cache(shape, dtype, poison_slots=pairs[1].tolist())
    flat = torch.empty(host.numel() + offset, dtype=dtype, device="cuda")
    cache = flat[offset:].view(shape)  # offset=1 leaves the base 2 bytes off 16-byte alignment
    cache.copy_(host)
    expected = ref_copy_ranges(host, *(t.cpu() for t in pairs))
    ops.kv_copy_ranges(cache, *pairs, check=True)
    torch.cuda.synchronize()
    assert_same(cache.cpu(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("num_pairs, max_len", [(3, 8192), (200, 40)])
def test_cuda_few_long_and_many_short_ranges(num_pairs, max_len):
    slots = 2 * num_pairs + 1
    pairs = random_pairs(slots, max_len, num_pairs, seed=num_pairs, index_dtype=torch.int64)
    host = make_cache((2, 2, slots, 2, max_len, 64), torch.bfloat16, poison_slots=pairs[1].tolist())
    cache = host.cuda()
    expected = ref_copy_ranges(host, *pairs)
    ops.kv_copy_ranges(cache, *(t.cuda() for t in pairs))
    assert_same(cache.cpu(), expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layers, num_pairs", [(1, 70_000), (32_770, 2)], ids=["pairs", "rows"])
def test_more_than_65535_pairs_or_rows(device, layers, num_pairs):
    # The CUDA grid caps gridDim.z (pairs) and gridDim.y (layer, K|V, head rows) at 65535; its
    # grid-stride loops must reach the pairs and rows beyond (here 70000 pairs, or 65540 rows).
    host = make_cache((layers, 2, 2 * num_pairs, 1, 3, 1), torch.float32)
    src = torch.arange(num_pairs)
    dst = src + num_pairs
    start, end = torch.ones_like(src), torch.full_like(src, 3)
    expected = host.clone()
    expected[:, :, dst, :, 1:] = host[:, :, src, :, 1:]
    cache = host.to(device)
    ops.kv_copy_ranges(cache, *(t.to(device) for t in (src, dst, start, end)))
    assert_same(cache.cpu(), expected)


@pytest.mark.gpu
def test_cuda_fork_promote_no_host_sync_and_graph_replay():
    shape = (2, 2, 8, 2, 64, 64)
    host = make_cache(shape, torch.bfloat16, poison_slots=range(1, 8))
    cache = host.cuda()
    lens = torch.tensor([20, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int32, device="cuda")
    src, dst = idx(0, 0, 0, device="cuda"), idx(1, 2, 3, device="cuda")
    winners = idx(0, device="cuda")
    groups = idx(0, 1, 2, 3, device="cuda").view(1, 4)
    start = idx(20, device="cuda")

    ref_cache, ref_lens = ref_fork(host, lens.cpu(), src.cpu(), dst.cpu())
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        ops.kv_fork(cache, lens, src, dst)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_same(cache.cpu(), ref_cache)
    assert torch.equal(lens.cpu(), ref_lens)

    # Capture one promote; then replay it with new winners/start/lens written into the same
    # tensors, as the engine does each step.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.kv_promote(cache, lens, winners, groups, start)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv_promote(cache, lens, winners, groups, start)
    for step, (w, length) in enumerate([(2, 29), (3, 41)]):
        lens.copy_(torch.tensor([length - 3, length - 1, length, length + 2, 0, 0, 0, 0],
                                dtype=torch.int32))
        lens[w] = length
        winners.fill_(w)
        start.fill_(20 + 9 * step)
        cache[:, :, 1:4, :, start.item():] = torch.randn_like(cache[:, :, 1:4, :, start.item():])
        host_now, lens_now = cache.cpu(), lens.cpu()
        ref_cache, ref_lens = ref_promote(host_now, lens_now, winners.cpu(), groups.cpu(), start.cpu())
        graph.replay()
        torch.cuda.synchronize()
        assert_same(cache.cpu(), ref_cache)
        assert torch.equal(lens.cpu(), ref_lens)
