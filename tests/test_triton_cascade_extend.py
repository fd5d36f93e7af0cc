"""Cascade extend attention (ragged new tokens per candidate over a shared prefix and a causal
per-candidate suffix): the reference, the CPU fast path and the Triton kernel against float64
attention over the concatenated prefix + suffix K/V with the causal mask, computed per (request,
candidate, token, head) with plain loops. The kernel runs on CUDA, or in Triton's interpreter on
CPU with TRITON_INTERPRET=1 (small shapes)."""
import functools
import math

import pytest
import torch

from far_views import far_suffix
from test_triton_cascade_decode import (DEVICE, FAR_STRIDE, assert_close, capture_launch,
                                        needs_triton, poison_unused)
from triton_kernels import cascade
from triton_kernels.cascade import cpu as cascade_cpu
from triton_kernels.reference import cascade_decode_attention, cascade_extend_attention

# The Triton kernels by name: the op's own dispatch runs the CPU path on CPU tensors.
kernel_extend = functools.partial(cascade.cascade_extend_attention, backend="triton")


def make_case(r, k, t, n_kv, g, hd, tp, ts, plens, slens, news, dtype=torch.float32, *, seed=0,
              poison=float("nan"), device="cpu"):
    """Random q / prefix / suffix; every unused cache position and every padded query is set to
    ``poison``. ``slens`` count the new tokens (``news``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(r, k, t, n_kv * g, hd, generator=gen)
    pk, pv = torch.randn(2, r, n_kv, tp, hd, generator=gen) * 2
    sk, sv = torch.randn(2, r, k, n_kv, ts, hd, generator=gen) * 2
    plen = torch.tensor(plens, dtype=torch.int32)
    slen = torch.tensor(slens, dtype=torch.int32).reshape(r, k)
    new = torch.tensor(news, dtype=torch.int32).reshape(r, k)
    assert (new <= slen).all() and (new <= t).all() and (slen <= ts).all()
    poison_unused(pk, pv, sk, sv, plen, slen, poison)
    for i in range(r):
        for c in range(k):
            q[i, c, new[i, c]:] = poison
    to = dict(device=device, dtype=dtype)
    return (q.to(**to), pk.to(**to), pv.to(**to), plen.to(device), sk.to(**to), sv.to(**to),
            slen.to(device), new.to(device))


def attention64(q, pk, pv, plen, sk, sv, slen, new):
    """float64: query t of (r, c) over cat(prefix[:plen], suffix[:slen - new + t + 1]); 0 where
    ``t >= new``."""
    r, k, t, h, hd = q.shape
    g = h // pk.shape[1]
    out = torch.zeros(r, k, t, h, hd, dtype=torch.float64)
    for i in range(r):
        for c in range(k):
            first = int(slen[i, c]) - int(new[i, c])
            for j in range(int(new[i, c])):
                for head in range(h):
                    kv = head // g
                    keys = torch.cat((pk[i, kv, :plen[i]], sk[i, c, kv, :first + j + 1]))
                    vals = torch.cat((pv[i, kv, :plen[i]], sv[i, c, kv, :first + j + 1]))
                    p = torch.softmax(keys.double().cpu() @ q[i, c, j, head].double().cpu()
                                      / math.sqrt(hd), dim=0)
                    out[i, c, j, head] = p @ vals.double().cpu()
    return out


# (R, K, T, n_kv, G, hd, Tp, Ts, prefix lens, suffix lens, new tokens): GQA 1..8, head_dim
# 64/80/128, prefix 0 / 1 / odd / long, ragged new-token counts including 0, 1 and T, suffixes
# that already held tokens before the new ones, and a candidate with nothing at all.
CASES = {
    "mha-hd64": (2, 3, 4, 2, 1, 64, 40, 6, [0, 37], [4, 1, 3, 0, 6, 2], [4, 1, 2, 0, 3, 2]),
    "gqa2-hd80-prefix1": (1, 4, 5, 2, 2, 80, 8, 6, [1], [0, 1, 6, 5], [0, 1, 5, 5]),
    "gqa4-hd128-odd": (2, 2, 3, 1, 4, 128, 33, 4, [33, 17], [3, 1, 2, 4], [3, 1, 1, 2]),
    "gqa7-hd64-long": (1, 5, 3, 1, 7, 64, 300, 5, [299], [1, 2, 3, 0, 5], [1, 2, 3, 0, 3]),
    "gqa8-hd80-t1": (3, 1, 1, 1, 8, 80, 20, 2, [0, 1, 19], [2, 1, 2], [1, 1, 0]),
    "gqa3-hd64-all-empty": (1, 3, 2, 2, 3, 64, 9, 3, [9], [0, 0, 0], [0, 0, 0]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_matches_float64_with_causal_suffix(name, dtype):
    args = make_case(*CASES[name], dtype, seed=len(name))
    out = cascade_extend_attention(*args)
    assert out.dtype == dtype
    assert_close(out, attention64(*args), dtype)


def test_one_new_token_is_decode_attention():
    """T = 1, num_new = 1: exactly the decode cascade (its own spec, tested elsewhere)."""
    q, pk, pv, plen, sk, sv, slen, new = make_case(2, 3, 1, 2, 2, 64, 10, 4, [10, 3],
                                                   [1, 2, 4, 3, 1, 2], [1] * 6)
    torch.testing.assert_close(cascade_extend_attention(q, pk, pv, plen, sk, sv, slen, new)[:, :, 0],
                               cascade_decode_attention(q[:, :, 0], pk, pv, plen, sk, sv, slen),
                               rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(1, 2, 3, 64)), r"q must be \[R, K, T, H, head_dim\]"),
    (dict(q=torch.zeros(1, 2, 0, 4, 64)), "T >= 1"),
    (dict(num_new=torch.zeros(2, 1, dtype=torch.int32)), "num_new must have shape"),
    (dict(num_new=torch.zeros(1, 2)), "num_new must be int32 or int64"),
    (dict(suffix_lens=torch.zeros(1, 3, dtype=torch.int32)), "suffix_lens must have shape"),
])
def test_bad_arguments_are_named(bad, match):
    names = ["q", "prefix_k", "prefix_v", "prefix_lens", "suffix_k", "suffix_v", "suffix_lens",
             "num_new"]
    args = dict(zip(names, make_case(1, 2, 3, 2, 2, 64, 8, 4, [3], [1, 2], [1, 2])))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        cascade_extend_attention(**args)


# ---- the CPU fast path (torch's fused CPU flash attention per part) ----------------------------

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fast_path_matches_float64(name, dtype):
    # Finite stale values (the cache's contract: positions past a length hold stale K/V).
    args = make_case(*CASES[name], dtype, seed=len(name) + 3, poison=1e4)
    assert_close(cascade_cpu.cascade_extend_attention(*args), attention64(*args), dtype)


# ---- Triton kernel -----------------------------------------------------------------------------

# CASES with a shorter long prefix (the interpreter is slow) that still spans several splits (chunk
# 32 in the interpreter) and tiles, a suffix crossing a 16-key tile, and rows of several candidates
# in one 16-row block (T·G < 16) as well as candidates spanning blocks (T·G > 16).
KERNEL_CASES = {name: case for name, case in CASES.items() if name != "gqa7-hd64-long"}
KERNEL_CASES["gqa7-hd64-long-split"] = (1, 3, 3, 1, 7, 64, 131, 19, [129], [19, 2, 17],
                                        [3, 2, 1])


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_with_causal_suffix(name, dtype):
    args = make_case(*KERNEL_CASES[name], dtype, seed=len(name) + 7, device=DEVICE)
    out = kernel_extend(*args)
    assert out.dtype == dtype
    assert_close(out, attention64(*args), dtype)
    if dtype == torch.float32:  # same function as the reference, up to summation order
        torch.testing.assert_close(out, cascade_extend_attention(*args), rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernel_reads_strided_cache_views_and_writes_out():
    """K/V as slices of slot caches ``[L, 2, S, n_kv, T, hd]`` (the engine's views), int32 length
    slices, a prefix bound tighter than the cache, and a preallocated ``out``."""
    r, k, t, n_kv, g, hd = 2, 3, 4, 2, 2, 64
    gen = torch.Generator().manual_seed(3)
    pcache = torch.randn(2, 2, r + 1, n_kv, 50, hd, generator=gen).to(DEVICE)
    scache = torch.randn(2, 2, (r + 1) * k, n_kv, 8, hd, generator=gen).to(DEVICE)
    plen = torch.tensor([7, 30, 0], dtype=torch.int32, device=DEVICE)[:r]
    slen = torch.tensor([1, 4, 3, 8, 5, 2, 0, 0, 0], dtype=torch.int32, device=DEVICE)[:r * k]
    new = torch.tensor([[1, 4, 2], [4, 0, 1]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(r, k, t, n_kv * g, hd, generator=gen).to(DEVICE)
    pk, pv = pcache[1, 0, :r, :, :32], pcache[1, 1, :r, :, :32]  # bound 32 >= every plen
    sk = scache[1, 0, :r * k].view(r, k, n_kv, 8, hd)
    sv = scache[1, 1, :r * k].view(r, k, n_kv, 8, hd)
    out = torch.full_like(q, float("nan"))
    args = (q, pk, pv, plen, sk, sv, slen.view(r, k), new)
    assert kernel_extend(*args, out=out) is out
    assert_close(out, attention64(*args), torch.float32)


@needs_triton
def test_kernel_candidate_offsets_past_int32():
    """Candidate 2's suffix past 2**31 elements (stride as in test_triton_cascade_decode)."""
    args = list(make_case(1, 3, 2, 1, 2, 64, 8, 4, [5], [2, 3, 4], [1, 2, 2], torch.float16,
                          seed=5, poison=0.0, device=DEVICE))
    args[4], args[5] = far_suffix(args[4], args[5], FAR_STRIDE)
    assert FAR_STRIDE < 2**31 <= 2 * args[4].stride(1)
    assert_close(kernel_extend(*args), attention64(*args), torch.float16)


def test_extend_launch_config_blocks_rows_and_splits_long_prefixes_on_gpu():
    few = cascade.extend_launch_config(1, 5, 16, 2, 7, 64, 8192, torch.bfloat16, num_sms=132)
    many = cascade.extend_launch_config(64, 5, 16, 8, 4, 128, 8192, torch.bfloat16, num_sms=132)
    assert few.block_q == 64 and few.row_blocks(5, 16, 7) == 9  # 560 rows
    assert few.n_splits > 1 and many.n_splits == 1
    for cfg in (few, many):
        assert cfg.chunk % cfg.block_n == 0 and cfg.chunk * cfg.n_splits >= 8192
        assert cfg.chunk * (cfg.n_splits - 1) < 8192
    assert cascade.extend_launch_config(1, 2, 1, 1, 1, 64, 0, torch.float32,
                                        num_sms=132).n_splits == 0


@pytest.mark.gpu
def test_kernel_replays_in_a_cuda_graph_with_new_lengths():
    """Lengths and new-token counts are read on the device: a captured launch follows values
    changed after capture (including a prefix growing into another split)."""
    r, k, t, n_kv, g, hd, tp, ts = 2, 4, 5, 2, 7, 64, 600, 16
    args = list(make_case(r, k, t, n_kv, g, hd, tp, ts, [300, 17], [1, 2, 3, 4, 5, 6, 7, 8],
                          [1, 2, 3, 4, 5, 0, 1, 2], torch.bfloat16, poison=0.0, device="cuda"))
    out = torch.empty_like(args[0])
    graph = capture_launch(kernel_extend, args, out)
    args[3].copy_(torch.tensor([599, 1], dtype=torch.int32))
    args[6].copy_(torch.tensor([[16, 1, 9, 5], [3, 3, 3, 0]], dtype=torch.int32))
    args[7].copy_(torch.tensor([[5, 1, 0, 5], [3, 2, 1, 0]], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, attention64(*args), torch.bfloat16)


# ---- the decoder's extend over a SharedPrefixCache ----------------------------------------------

def test_decoder_extend_shared_equals_full_forward():
    """Hidden states of every real new token (ragged steps, a candidate with none, a suffix that
    already held tokens, non-contiguous groups) equal a full forward over prefix + suffix."""
    from mahalo_engine.layouts import SharedPrefixCache
    from mahalo_engine.tiny import tiny_checkpoint
    from mahalo_engine.models.loader import load_decoder

    model = load_decoder(tiny_checkpoint("qwen3"), dtype=torch.float32)
    k, gen = 2, torch.Generator().manual_seed(0)
    cache = SharedPrefixCache.allocate(model.config, 3, k, 40, 8, dtype=torch.float32,
                                       device="cpu")
    prompts = {0: [5, 9, 13, 2, 7], 2: [11, 3, 8]}
    model.prefill(cache.prefix, list(prompts.values()), list(prompts))
    seqs = {(g, c): list(p) for g, p in prompts.items() for c in range(k)}
    groups = torch.tensor([2, 0])
    for steps in ([[3, 1], [0, 4]], [[2, 2], [1, 0]]):  # two extends: the second continues
        num_new = torch.tensor(steps)
        ids = torch.randint(0, model.config.vocab_size, (2, k, 4), generator=gen)
        hidden = model.extend_shared(cache, ids, num_new, groups)
        for i, g in enumerate(groups.tolist()):
            for c in range(k):
                m = int(num_new[i, c])
                seqs[g, c] += ids[i, c, :m].tolist()
                if m == 0:
                    continue
                full = model(torch.tensor([seqs[g, c]]))[0, -m:]
                torch.testing.assert_close(hidden[i, c, :m], full, rtol=1e-4, atol=1e-4)
    assert cache.suffix.lens.tolist() == [1, 4, 0, 0, 5, 3]  # group g: slots 2g, 2g+1


def test_decoder_extend_shared_names_bad_arguments():
    from mahalo_engine.layouts import SharedPrefixCache
    from mahalo_engine.tiny import tiny_checkpoint
    from mahalo_engine.models.loader import load_decoder

    model = load_decoder(tiny_checkpoint("qwen2"), dtype=torch.float32)
    cache = SharedPrefixCache.allocate(model.config, 2, 2, 16, 3, dtype=torch.float32,
                                       device="cpu")
    ids = torch.zeros(1, 2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="step_len=3"):
        model.extend_shared(cache, ids, torch.tensor([[4, 1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="groups must be distinct"):
        model.extend_shared(cache, ids, torch.tensor([[1, 1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"input_ids must be \[G, K=2, T\]"):
        model.extend_shared(cache, ids[:, :1], torch.tensor([[1]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="use extend_shared"):
        model.extend(cache, ids[0], torch.tensor([1, 1]), torch.tensor([0, 1]))
