"""Fused multi-head projection and sampling (triton_kernels) against float64 and torch references.

Runs the Triton kernels on CUDA, or in Triton's interpreter on CPU with TRITON_INTERPRET=1; on CPU
without it the kernel tests skip (the launchers then run triton_kernels.multihead.cpu, tested against the
reference in tests/test_triton_multihead_cpu.py).
"""
import logging
import math
import os

import pytest
import torch
import triton

import triton_kernels
from triton_kernels import (MergeCache, SamplingPlan, merge_shared_heads, multihead_logits,
                            multihead_sample, plan_heads)
from triton_kernels import reference
from triton_kernels.multihead import cpu
from triton_kernels.multihead import launcher as multihead

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1 (CPU interpreter); without "
    "either the launchers run triton_kernels.multihead.cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# The launchers (kernels) and the pure-torch spec the engine runs on CPU: both must sample right.
SAMPLERS = [pytest.param(multihead_sample, marks=needs_triton, id="kernels"),
            pytest.param(reference.multihead_sample, id="reference"),
            pytest.param(cpu.multihead_sample, id="cpu", marks=pytest.mark.skipif(
                DEVICE.type != "cpu", reason="triton_kernels.multihead.cpu takes CPU tensors"))]


def make_inputs(B, H, V, d, dtype=torch.float32, *, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, d, generator=g)
    heads = torch.randn(H, V, d, generator=g) * (scale / math.sqrt(d))
    weights = torch.rand(B, H, generator=g) + 0.1  # distinct rows: the general (unmerged) path
    return hidden.to(DEVICE, dtype), heads.to(DEVICE, dtype), weights.to(DEVICE)


def logits64(hidden, heads, weights):
    return torch.einsum("bh,hvd,bd->bv", weights.double(), heads.double(), hidden.double())


def rel_err(z, ref):
    return ((z.double() - ref).abs().max() / ref.abs().max()).item()


def tv_bound(p: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """Upper bound on TV(empirical of n draws from p, p) that fails with probability < delta.

    E|p̂_i - p_i| ≤ sqrt(p_i(1-p_i)/n), so E[TV] ≤ ½ Σ_i sqrt(p_i(1-p_i)/n); TV changes by at most
    1/n when one draw changes, so McDiarmid gives P(TV ≥ E[TV] + t) ≤ exp(-2nt²).
    """
    p = p.double()
    return 0.5 * torch.sqrt(p * (1 - p) / n).sum().item() + math.sqrt(math.log(1 / delta) / (2 * n))


def tv_distance(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount(tokens.cpu(), minlength=p.numel()).double()
    return 0.5 * (counts / tokens.numel() - p.double().cpu()).abs().sum().item()


def identical_rows(n, V, d, *, H=1, seed=0, scale=5.0):
    hidden, heads, weights = make_inputs(1, H, V, d, seed=seed, scale=scale)
    return hidden.expand(n, d), heads, weights.expand(n, H), logits64(hidden, heads, weights)[0]


def tied_inputs(B, V, d):
    """Rows whose V logits all tie exactly: small-integer hidden states, one small-integer column
    for every token and weights 1, so each logit is the same integer whatever the order of
    summation (with random floats the interpreter's numpy dot rounds some columns differently)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randint(-3, 4, (B, d), generator=g).float()
    column = torch.randint(-3, 4, (1, 1, d), generator=g).float()
    return hidden.to(DEVICE), column.expand(1, V, d).contiguous().to(DEVICE), torch.ones(B, 1, device=DEVICE)


def top_k_key(z: torch.Tensor, k: int) -> torch.Tensor:
    """Answer key for top-k, independent of ``reference.top_k_mask``: bool ``[B,V]`` marking each
    row's ``k`` largest entries, ties to the lower index, by a plain Python stable sort."""
    keep = torch.zeros(z.shape, dtype=torch.bool)
    for b, row in enumerate(z.double().cpu().tolist()):
        keep[b, sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]] = True
    return keep.to(z.device)


def capture(call):
    """``(graph, outputs)`` of ``call`` captured in a CUDA graph (warmed up on a side stream
    first: compile and plan outside the capture)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()
    return graph, outputs


# ----------------------------------------------------------------------------------- logits


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,V,d", [(1, 1, 37, 24), (5, 3, 300, 40), (70, 2, 130, 72),
                                     (300, 8, 40, 20)])
def test_logits_match_float64(B, H, V, d, dtype):
    hidden, heads, weights = make_inputs(B, H, V, d, dtype)
    out = torch.full((B, V), float("nan"), device=DEVICE)  # poison: every element must be written
    z = multihead_logits(hidden, heads, weights, out=out)
    assert z is out and z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    assert rel_err(z, logits64(hidden, heads, weights)) <= TOL[dtype]


@needs_triton
def test_logits_strided_inputs_and_fresh_output():
    hidden, heads, weights = make_inputs(6, 3, 150, 34)
    wide = torch.zeros(6, 68, device=DEVICE)
    wide[:, ::2] = hidden  # hidden with stride 2 along d
    heads_t = heads.transpose(0, 1).contiguous().transpose(0, 1)  # [H,V,d] view, V-major storage
    weights_t = weights.t().contiguous().t()
    z = multihead_logits(wide[:, ::2], heads_t, weights_t)
    assert z.shape == (6, 150) and z.is_contiguous()
    assert rel_err(z, logits64(hidden, heads, weights)) <= 1e-5


@needs_triton
@pytest.mark.parametrize("which", ["head", "vocab"])
def test_offsets_past_2_31_elements(which):
    """A heads view whose element offsets pass 2**31 while every stride fits in int32 (as with
    H·V·d > 2**31 for V = 151936, d = 4096, H ≥ 4): an int32 product wraps to a wrong address.
    The storage spans 4-5 GB but only the viewed elements are touched (on CPU the rest stays
    uncommitted zero pages)."""
    H, V, d = 3, 40, 24
    strides = (2**30 + 64, d, 1) if which == "head" else (d, 2**26 + 64, 1)
    span = sum((n - 1) * s for n, s in zip((H, V, d), strides)) + 1
    assert span > 2**31 and max(strides) < 2**31
    storage = torch.empty(span, dtype=torch.bfloat16, device=DEVICE)
    heads = storage.as_strided((H, V, d), strides)
    _, small, weights = make_inputs(4, H, V, d, torch.bfloat16, scale=3.0)
    heads.copy_(small)
    hidden = make_inputs(4, H, V, d, torch.bfloat16)[0]
    # No plan: the general path, so the kernel reads all H heads itself.
    ref = logits64(hidden, heads, weights)
    assert rel_err(multihead_logits(hidden, heads, weights), ref) <= TOL[torch.bfloat16]
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=0.0)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * TOL[torch.bfloat16] * ref.abs().max()
    assert clear.any() and torch.equal(tokens[clear], ref.argmax(dim=1)[clear])


def test_reference_logits_match_float64():
    hidden, heads, weights = make_inputs(5, 3, 300, 40)
    assert rel_err(reference.multihead_logits(hidden, heads, weights),
                   logits64(hidden, heads, weights)) <= 1e-5


# ----------------------------------------------------------------------------------- greedy / log-probs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.0, 7), (0.6, 1)])
def test_greedy_is_argmax_with_untruncated_logprobs(dtype, temperature, top_k):
    hidden, heads, weights = make_inputs(70, 3, 300, 40, dtype, scale=3.0)
    z = logits64(hidden, heads, weights)
    tokens, logprobs = multihead_sample(hidden, heads, weights, temperature=temperature, top_k=top_k)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    top2 = z.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * TOL[dtype] * z.abs().max()  # no tie within tolerance
    assert clear.sum() > 35
    assert torch.equal(tokens[clear], z.argmax(dim=1)[clear])
    # |Δ log_softmax| ≤ |Δz_token| + |Δlogsumexp| ≤ 2·max|Δz|, with max|Δz| ≤ TOL·max|z| (logits test).
    scaled = z / (temperature if temperature > 0 else 1.0)
    expected = torch.log_softmax(scaled, dim=1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), expected,
                               atol=2 * TOL[dtype] * scaled.abs().max().item(), rtol=0)


@needs_triton
def test_greedy_ties_go_to_lowest_index():
    hidden, heads, weights = make_inputs(4, 1, 200, 16)
    heads[:, 150:] = heads[:, 3:53]  # columns 150.. duplicate columns 3..52 exactly
    heads[:, 3] = heads[:, 3] + 100 * hidden[0] / hidden[0].norm()  # row 0's max at column 3
    heads[:, 150] = heads[:, 3]  # tie in another tile and chunk
    heads[:, 60] = heads[:, 3]  # tie in the same tile
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=0.0)
    assert tokens[0].item() == 3


@needs_triton
@pytest.mark.parametrize("top_k", [0, 6])
def test_sampled_logprobs_are_untruncated(top_k):
    hidden, heads, weights = make_inputs(64, 2, 300, 40, scale=3.0)
    tokens, logprobs = multihead_sample(hidden, heads, weights, temperature=0.7, top_k=top_k, seed=5)
    expected = torch.log_softmax(logits64(hidden, heads, weights) / 0.7, dim=1)
    torch.testing.assert_close(logprobs.double(), expected.gather(1, tokens[:, None]).squeeze(1),
                               atol=1e-4, rtol=0)


@needs_triton
@pytest.mark.parametrize("temperature,top_k,filters", [  # greedy shares the finish path
    (0.9, 0, {}), (0.9, 5, {}), (0.9, 5, dict(top_p=0.8, min_p=0.02)),
    (0.9, 0, dict(top_p=0.8, min_p=0.02))])  # the last: MODE_FILTER, several parts and chunks
def test_sampling_does_not_depend_on_the_launch_config(monkeypatch, temperature, top_k, filters):
    """GPU configs take paths the interpreter's defaults skip: many partials per row (the finish
    kernel loops over several BLOCK_P chunks, the last partly masked), several V tiles per top-k
    partial, several finish programs. Philox numbers are per (row, token), so the tokens must not
    change with the tiling."""
    hidden, heads, weights = make_inputs(20, 2, 300, 40, scale=3.0)
    draw = lambda: multihead_sample(hidden, heads, weights, temperature=temperature, top_k=top_k,
                                    seed=3, offset=1, **filters)
    tokens = draw()[0]

    def gpu_like(B, V, d, dtype, device, kpad=1, filtered=False):
        block_v = max(16, kpad)
        n_tiles = triton.cdiv(V, block_v)
        per_part = 3 if kpad > 1 else 1  # as launch_config does on a GPU
        # Top-k: the finish merges 2 parts' candidates per step over several steps, 1 row each.
        # The filter kernel: 4 partials per step, 64 z/T entries per step of a pass.
        return multihead.LaunchConfig(16, block_v, 16, 4, 1, n_tiles, per_part,
                                      triton.cdiv(n_tiles, per_part), 1 if kpad > 1 else 4, 4,
                                      16, 2 if kpad > 1 else 1, filter_block=64)

    monkeypatch.setattr(multihead, "_config", gpu_like)
    tokens_gpu, logprobs_gpu = draw()
    assert torch.equal(tokens_gpu, tokens)
    expected = torch.log_softmax(logits64(hidden, heads, weights) / temperature, dim=1)
    torch.testing.assert_close(logprobs_gpu.double(), expected.gather(1, tokens[:, None])[:, 0],
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- top-k mask


def test_top_k_mask_hand_examples():
    T, F = True, False
    cases = [([[3.0, 1.0, 2.0, 0.0]], 2, [[T, F, T, F]]),
             ([[1.0, 1.0, 1.0, 0.0]], 2, [[T, T, F, F]]),  # ties to the lower index
             ([[0.0, 2.0, 2.0, 2.0, 1.0]], 2, [[F, T, T, F, F]]),
             ([[5.0, 5.0], [-1.0, 4.0]], 1, [[T, F], [F, T]]),
             ([[0.5, -float("inf"), 0.25]], 3, [[T, T, T]])]
    for scaled, k, expected in cases:
        assert reference.top_k_mask(torch.tensor(scaled), k).tolist() == expected, (scaled, k)


@pytest.mark.parametrize("top_k", [1, 5, 22, 23])
def test_top_k_mask_keeps_exactly_k_on_rows_with_ties(top_k):
    z = torch.randint(0, 4, (50, 23), generator=torch.Generator().manual_seed(0)).float()
    mask = reference.top_k_mask(z, top_k)
    assert mask.sum(1).eq(top_k).all()
    assert torch.equal(mask, top_k_key(z, top_k))


# ----------------------------------------------------------------------------------- distributions

N_DRAWS = 8000
T_DIST = 0.8


@pytest.fixture(scope="module")
def plain_draws():
    hidden, heads, weights, z = identical_rows(N_DRAWS, 200, 16)
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=T_DIST, seed=11)
    return tokens, z


@needs_triton
def test_sampling_matches_softmax_distribution(plain_draws):
    tokens, z = plain_draws
    p = torch.softmax(z / T_DIST, dim=0)
    assert tv_distance(tokens, p) <= tv_bound(p, N_DRAWS)


@needs_triton
def test_distribution_check_fails_for_wrong_temperature(plain_draws):
    tokens, z = plain_draws
    wrong = torch.softmax(z / (1.5 * T_DIST), dim=0).cpu()
    right = torch.softmax(z / T_DIST, dim=0).cpu()
    # Precondition: TV(p̂, wrong) ≥ TV(right, wrong) - TV(p̂, right) > tv_bound(wrong) w.h.p.
    assert 0.5 * (wrong - right).abs().sum().item() > tv_bound(right, N_DRAWS) + tv_bound(wrong, N_DRAWS)
    assert tv_distance(tokens, wrong) > tv_bound(wrong, N_DRAWS)


@pytest.mark.parametrize("sample", SAMPLERS)
def test_top_k_matches_renormalised_distribution(sample):
    top_k, T, n = 20, 1.5, 4000
    hidden, heads, weights, z = identical_rows(n, 300, 16, seed=1)
    tokens, _ = sample(hidden, heads, weights, temperature=T, top_k=top_k, seed=3)
    keep = top_k_key(z[None], top_k)[0].cpu()
    assert bool(keep[tokens.cpu()].all()), "sampled outside the top k"
    p = torch.softmax((z.cpu() / T).masked_fill(~keep, float("-inf")), dim=0)
    assert tv_distance(tokens, p) <= tv_bound(p, n)


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("V,top_k,B", [(400, 3, 64), (400, 100, 64), (400, 128, 64), (5, 3, 64),
                                       (17, 16, 64), (400, 7, 5)])  # B = 5: 8 of 16 rows sorted
def test_top_k_never_leaves_the_top_k(sample, V, top_k, B):
    hidden, heads, weights = make_inputs(B, 2, V, 24, scale=0.3)  # flat: all k are reachable
    tokens, _ = sample(hidden, heads, weights, temperature=1.0, top_k=top_k, seed=9)
    keep = top_k_key(logits64(hidden, heads, weights), top_k)
    assert bool(keep.gather(1, tokens[:, None]).all())


@pytest.mark.parametrize("sample", SAMPLERS)
def test_top_k_ties_go_to_lowest_indices(sample):
    hidden, heads, weights = tied_inputs(256, 160, 16)
    tokens, logprobs = sample(hidden, heads, weights, temperature=1.0, top_k=4, seed=2)
    # 256 draws from 4 equally likely tokens miss one with probability 4·(3/4)^256 < 1e-31.
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(logprobs, torch.full_like(logprobs, -math.log(160)))


def test_reference_sampling_matches_distribution():
    hidden, heads, weights, z = identical_rows(N_DRAWS, 200, 16)
    tokens, _ = reference.multihead_sample(hidden, heads, weights, temperature=T_DIST, seed=1)
    p = torch.softmax(z / T_DIST, dim=0)
    assert tv_distance(tokens, p) <= tv_bound(p, N_DRAWS)


# ------------------------------------------------------------------ top-p / min-p / any top-k


def filtered_key(z: torch.Tensor, T: float, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0) -> torch.Tensor:
    """Answer key, independent of the code under test: the float64 distribution ``[V]`` left by
    top-k, then top-p over the renormalised remainder, then min-p relative to the top token
    (transformers' order), ties to the lower index — by an explicit Python sort."""
    s = (z.double().cpu() / T).tolist()
    order = sorted(range(len(s)), key=lambda j: (-s[j], j))
    if 0 < top_k < len(s):
        order = order[:top_k]
    w = {j: math.exp(s[j] - s[order[0]]) for j in order}
    total, above, kept = sum(w.values()), 0.0, []
    for j in order:
        if top_p >= 1 or above < top_p:
            kept.append(j)
        above += w[j] / total
    p = torch.zeros(len(s), dtype=torch.float64)
    for j in kept:
        if w[j] >= min_p:  # w[j] = p_j / p_max
            p[j] = w[j]
    return p / p.sum()


def draws_for(sample) -> int:
    """Draws per distribution test: the interpreter runs the filter kernel's programs one by one."""
    return 300 if sample is multihead_sample and DEVICE.type == "cpu" else 4000


# Cutoffs chosen away from rounding: no cumulative mass within 1e-3 of top_p, no probability
# ratio within 1e-3 of min_p (asserted below, so a change of inputs cannot make them flaky).
FILTERS = [dict(top_p=0.8), dict(min_p=0.05), dict(top_p=0.5, min_p=0.55),
           dict(top_k=20, top_p=0.7, min_p=0.02), dict(top_k=150, top_p=0.85)]


def _clear_of_cutoffs(z, T, top_k=0, top_p=1.0, min_p=0.0):
    s = torch.sort(z.double().cpu() / T, descending=True).values
    if 0 < top_k < len(s):
        s = s[:top_k]
    p = torch.softmax(s, 0)
    assert ((p.cumsum(0) - p) - top_p).abs().min() > 1e-3 or top_p == 1
    assert ((p / p[0]) - min_p).abs().min() > 1e-3 or min_p == 0


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("options", FILTERS,
                         ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_filters_match_the_exact_filtered_distribution(sample, options):
    T, n, V = 1.5, draws_for(sample), 48
    if options.get("top_k", 0) > 128:  # the bisection path: ~40 passes per row
        V, n = 300, (24 if n < 4000 else n)  # the interpreter: a membership check, mostly
    hidden, heads, weights, z = identical_rows(n, V, 16, seed=1)
    _clear_of_cutoffs(z, T, **options)
    tokens, _ = sample(hidden, heads, weights, temperature=T, seed=3, **options)
    p = filtered_key(z, T, **options)
    assert bool((p[tokens.cpu()] > 0).all()), "drew a token the filters remove"
    assert 1 < int((p > 0).sum()) < V  # the case filters, and leaves a choice
    assert tv_distance(tokens, p) <= tv_bound(p, n)


@pytest.mark.parametrize("sample", SAMPLERS)
def test_filter_distribution_check_fails_for_the_unfiltered_distribution(sample):
    """The TV check above can fail: filtered draws are far from the full softmax."""
    T, n = 1.5, draws_for(sample)
    hidden, heads, weights, z = identical_rows(n, 48, 16, seed=1)
    tokens, _ = sample(hidden, heads, weights, temperature=T, seed=3, min_p=0.55)  # keeps 1/3
    full = filtered_key(z, T)
    assert tv_distance(tokens, full) > tv_bound(full, n)


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("top_k", [0, 6])
def test_top_p_one_and_min_p_zero_filter_nothing_bit_for_bit(sample, top_k):
    hidden, heads, weights = make_inputs(12, 2, 200, 16, scale=2.0)
    plain = sample(hidden, heads, weights, temperature=0.9, top_k=top_k, seed=4, offset=2)
    for kw in (dict(top_p=1.0, min_p=0.0), dict(top_p=torch.ones(12, device=DEVICE)),
               dict(min_p=torch.zeros((), device=DEVICE))):
        tokens, logprobs = sample(hidden, heads, weights, temperature=0.9, top_k=top_k, seed=4,
                                  offset=2, **kw)
        assert torch.equal(tokens, plain[0]), kw
        if sample is multihead_sample and top_k == 0 and len(kw) == 1:
            # A tensor runs MODE_FILTER, whose filter kernel sums the log-sum-exp partials in
            # its own order: the same draw (same noise), log-probs equal to fp32 rounding.
            torch.testing.assert_close(logprobs, plain[1], atol=1e-6, rtol=0)
        else:
            assert torch.equal(logprobs, plain[1]), kw


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("options", [dict(top_p=1e-3), dict(min_p=1.0), dict(top_k=8, top_p=1e-3),
                                     dict(top_k=8, min_p=1.0)])
def test_tiny_top_p_and_min_p_one_are_greedy(sample, options):
    hidden, heads, weights = make_inputs(16, 2, 200, 16, scale=2.0)  # no ties at the top
    greedy, greedy_lp = sample(hidden, heads, weights, temperature=0.0)
    tokens, logprobs = sample(hidden, heads, weights, temperature=1.3, seed=1, **options)
    assert torch.equal(tokens, greedy)
    expected = torch.log_softmax(logits64(hidden, heads, weights) / 1.3, -1)
    torch.testing.assert_close(logprobs.double(), expected.gather(1, tokens[:, None])[:, 0],
                               atol=1e-4, rtol=0)  # untruncated log-softmax at T


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("options", [dict(top_p=0.505), dict(min_p=1.0), dict(top_k=4, top_p=0.9)])
def test_filters_on_tied_rows(sample, options):
    """160 equal logits: top-p 0.505 keeps the 81 lowest indices (exclusive mass j/160 < 0.505:
    j <= 80), min-p 1 keeps them all, top-k 4 then top-p 0.9 keeps 0..3."""
    hidden, heads, weights = tied_inputs(128, 160, 16)
    tokens, logprobs = sample(hidden, heads, weights, temperature=1.0, seed=2, **options)
    kept = {"top_p": 81, "min_p": 160}.get(next(iter(options)), 4)
    assert tokens.lt(kept).all()
    # Spread over the kept set: 128 uniform draws from 81 (160) tokens hit ~64 (~88) of them.
    assert len(set(tokens.tolist())) > min(kept, 128) // 3
    torch.testing.assert_close(logprobs, torch.full_like(logprobs, -math.log(160)))


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("top_k", [0, 5])
def test_per_row_top_p_and_min_p_equal_per_row_float_calls(sample, top_k):
    hidden, heads, weights = make_inputs(12, 2, 150, 16, scale=4.0)
    top_p = torch.tensor([1.0, 0.6, 0.3], device=DEVICE).repeat(4)
    min_p = torch.tensor([0.0, 0.0, 0.1, 0.4], device=DEVICE).repeat(3)
    temps = torch.tensor([0.8, 0.0, 1.1, 0.8], device=DEVICE).repeat(3)
    tokens, logprobs = sample(hidden, heads, weights, temperature=temps, top_k=top_k, top_p=top_p,
                              min_p=min_p, seed=6, offset=1)
    for b in range(12):
        t, p, m = temps[b].item(), top_p[b].item(), min_p[b].item()
        ref = sample(hidden, heads, weights, temperature=t, top_k=top_k, top_p=p, min_p=m,
                     seed=6, offset=1)
        assert tokens[b] == ref[0][b], b
        torch.testing.assert_close(logprobs[b], ref[1][b], atol=1e-5, rtol=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(top_p=0.7), dict(top_k=6, min_p=0.2)])
def test_filters_stay_in_the_kept_set_for_every_dtype(dtype, options):
    hidden, heads, weights = make_inputs(16, 2, 200, 32, dtype, scale=3.0)
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=1.0, seed=8, **options)
    z = multihead_logits(hidden, heads, weights)  # the kernels' own fp32 logits of these inputs
    for b in range(16):
        assert filtered_key(z[b], 1.0, **options)[tokens[b].item()] > 0, b


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [0, 8])
def test_cuda_graph_replay_reads_the_top_p_and_min_p_buffers(top_k):
    """A captured call samples with whatever the top_p/min_p tensors hold at replay."""
    hidden, heads, weights = make_inputs(8, 2, 1000, 64, torch.bfloat16, scale=0.5)
    top_p = torch.ones(8, device=DEVICE)
    min_p = torch.zeros((), device=DEVICE)
    call = lambda: multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k,
                                    top_p=top_p, min_p=min_p, seed=5, offset=3)
    graph, (tokens, logprobs) = capture(call)
    for p, m in ((1.0, 0.0), (0.5, 0.0), (1.0, 0.3), (1e-6, 0.0)):
        top_p.fill_(p)
        min_p.fill_(m)
        graph.replay()
        expected = multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k,
                                    top_p=p, min_p=m, seed=5, offset=3)
        assert torch.equal(tokens, expected[0]), (p, m)
        torch.testing.assert_close(logprobs, expected[1], atol=1e-6, rtol=0)


@needs_triton
def test_top_k_above_128_takes_the_exact_threshold_path():
    """k > 128 (the threshold bisection), rows with ties across the cut: exactly the k lowest
    indices among the tied logits, never a token outside the top k."""
    hidden, heads, weights = tied_inputs(6, 200, 8)
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=1.0, top_k=150, seed=1)
    assert tokens.lt(150).all()
    hidden, heads, weights = make_inputs(6, 2, 200, 16, scale=0.3)
    tokens, _ = multihead_sample(hidden, heads, weights, temperature=1.0, top_k=140, seed=2)
    keep = top_k_key(logits64(hidden, heads, weights), 140)
    assert bool(keep.gather(1, tokens[:, None]).all())
    assert multihead.sampling_mode(1.0, 140, 200)[0] == multihead.MODE_FILTER


def test_sampling_modes_for_the_filters():
    mode = lambda *a, **k: multihead.sampling_mode(*a, **k)[0]
    assert mode(1.0, 0, 100) == mode(1.0, 0, 100, top_p=1.0, min_p=0.0) == multihead.MODE_GUMBEL
    assert mode(1.0, 0, 100, top_p=0.9) == mode(1.0, 0, 100, min_p=0.1) == multihead.MODE_FILTER
    assert mode(1.0, 0, 100, top_p=torch.ones(())) == multihead.MODE_FILTER
    assert mode(1.0, 50, 100, top_p=0.9) == multihead.MODE_TOPK  # filtered in the finish kernel
    assert mode(1.0, 200, 1000) == multihead.MODE_FILTER  # any top-k: the threshold path
    assert mode(1.0, 200, 200) == multihead.MODE_GUMBEL  # top_k >= V keeps every token
    assert mode(0.0, 0, 100, top_p=0.5) == mode(1.0, 1, 100, min_p=0.5) == multihead.MODE_GREEDY


# ----------------------------------------------------------------------------------- seeds


@needs_triton
@pytest.mark.parametrize("top_k", [0, 8])
def test_same_seed_same_tokens_new_offset_new_tokens(top_k):
    hidden, heads, weights = make_inputs(256, 2, 200, 16, scale=0.5)
    draw = lambda **kw: multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k, **kw)[0]
    first = draw(seed=7, offset=3)
    assert torch.equal(first, draw(seed=7, offset=3))
    # Near-uniform over 200 (or 8) tokens: an independent redraw repeats a row's token rarely.
    repeat = 1 / (top_k or 200)
    for other in (draw(seed=7, offset=4), draw(seed=8, offset=3)):
        assert (other == first).float().mean().item() < repeat + 0.15


@needs_triton
@pytest.mark.parametrize("top_k", [0, 8])
def test_device_seed_and_offset_are_read_on_device(top_k):
    hidden, heads, weights = make_inputs(64, 2, 200, 16, scale=0.5)
    seed_t = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    offset_t = torch.tensor([3], dtype=torch.int64, device=DEVICE)
    draw = lambda s, o: multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k,
                                         seed=s, offset=o)[0]
    assert torch.equal(draw(seed_t, offset_t), draw(7, 3))
    offset_t.add_(1)  # what a CUDA-graph step does between replays
    assert torch.equal(draw(seed_t, offset_t), draw(7, 4))
    assert not torch.equal(draw(7, 4), draw(7, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [0, 8])
def test_cuda_graph_replay_draws_fresh_numbers(top_k):
    hidden, heads, weights = make_inputs(8, 2, 1000, 64, torch.bfloat16, scale=0.5)
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    offset = torch.tensor([0], dtype=torch.int64, device=DEVICE)
    call = lambda: multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k,
                                    seed=seed, offset=offset)
    graph, (tokens, logprobs) = capture(call)
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        expected = multihead_sample(hidden, heads, weights, temperature=1.0, top_k=top_k, seed=5,
                                    offset=step)
        assert torch.equal(tokens, expected[0])
        torch.testing.assert_close(logprobs, expected[1])


# ----------------------------------------------------------------------------- temperature tensors

TEMPS = [0.0, 0.5, 1.25, 0.7]  # 0.7 is not an fp32 number: the float calls get float(fp32(0.7))


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("top_k", [0, 7, 1])
def test_per_row_temperatures_equal_per_row_float_calls(sample, top_k):
    """A [B] tensor mixing greedy (0) and sampling rows: each row gets exactly what a float call
    at its temperature gives it (same batch, seed and offset, so the same random numbers)."""
    hidden, heads, weights = make_inputs(40, 2, 300, 24, scale=3.0)
    temps = torch.tensor(TEMPS, device=DEVICE)[torch.arange(40, device=DEVICE) % len(TEMPS)]
    tokens, logprobs = sample(hidden, heads, weights, temperature=temps, top_k=top_k, seed=3,
                              offset=2)
    for t in temps.unique().tolist():
        rows = temps == t
        ref_tokens, ref_logprobs = sample(hidden, heads, weights, temperature=t, top_k=top_k,
                                          seed=3, offset=2)
        assert torch.equal(tokens[rows], ref_tokens[rows]), t
        torch.testing.assert_close(logprobs[rows], ref_logprobs[rows], atol=1e-5, rtol=0)
    if top_k != 1:  # the sampling rows did sample: not all of them took the argmax
        greedy = sample(hidden, heads, weights, temperature=0.0)[0]
        assert not torch.equal(tokens[temps > 0], greedy[temps > 0])


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("t,top_k", [(0.0, 0), (0.75, 0), (0.0, 5), (0.75, 5)])
def test_one_temperature_tensor_equals_the_float_call(sample, shape, t, top_k):
    hidden, heads, weights = make_inputs(24, 2, 200, 16, scale=3.0)
    temperature = torch.full(shape, t, device=DEVICE)
    tokens, logprobs = sample(hidden, heads, weights, temperature=temperature, top_k=top_k,
                              seed=5, offset=1)
    ref_tokens, ref_logprobs = sample(hidden, heads, weights, temperature=t, top_k=top_k, seed=5,
                                      offset=1)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("B", [16, 6])  # 6: the kernels' network sorts 8 live rows, not 16
def test_zero_temperature_rows_of_top_k_break_ties_to_lowest_index(sample, B):
    """T = 0 rows under top-k pick from the merged candidates, which come in no set order."""
    hidden, heads, weights = tied_inputs(B, 160, 16)
    temps = torch.tensor([0.0, 1.0], device=DEVICE).repeat(B // 2)
    tokens, _ = sample(hidden, heads, weights, temperature=temps, top_k=4, seed=2)
    assert tokens[temps == 0].eq(0).all() and tokens[temps > 0].lt(4).all()


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_temperature_buffer():
    hidden, heads, weights = make_inputs(8, 2, 1000, 64, torch.bfloat16, scale=0.5)
    temperature = torch.zeros(8, device=DEVICE)
    offset = torch.tensor([4], dtype=torch.int64, device=DEVICE)
    call = lambda: multihead_sample(hidden, heads, weights, temperature=temperature, top_k=8,
                                    seed=5, offset=offset)
    graph, (tokens, logprobs) = capture(call)
    for values in ([0.0] * 8, [1.5] * 8, [0.0, 0.75] * 4):  # fp32 numbers: as the float calls
        temperature.copy_(torch.tensor(values))
        graph.replay()
        for t in set(values):
            rows = temperature == t
            expected = multihead_sample(hidden, heads, weights, temperature=t, top_k=8, seed=5,
                                        offset=4)
            assert torch.equal(tokens[rows], expected[0][rows])
            torch.testing.assert_close(logprobs[rows], expected[1][rows], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- shared weights


def shared_weight_inputs(dtype=torch.float32):
    hidden, heads, _ = make_inputs(6, 3, 300, 40, dtype, scale=3.0)
    rows = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.0, 0.4]], device=DEVICE)
    return hidden, heads, rows[torch.tensor([0, 1, 1, 0, 0, 1])]  # U = 2 < H = 3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "distinct"])
def test_plan_equals_float64_mix(dtype, shared):
    """The plan's distinct rows and row index rebuild the weights; its operands (merged heads and
    one-hot weights when rows share weights, else the heads) give the float64 mixture, through the
    launcher, the custom op and the plan's mixed heads."""
    hidden, heads, weights = (shared_weight_inputs(dtype) if shared
                              else make_inputs(6, 3, 300, 40, dtype, scale=3.0))
    plan = plan_heads(heads, weights)
    assert torch.equal(plan.rows[plan.index], weights.cpu())
    assert plan.merged == shared and len(plan.rows) == (2 if shared else 6)
    assert (plan.heads.shape[0], plan.weights.shape) == ((2, (6, 2)) if shared else (3, (6, 3)))
    ref = logits64(hidden, heads, weights)
    z_plan = multihead.multihead_logits(hidden, heads, weights, plan=plan)
    z_op = multihead_logits(hidden, plan.heads, plan.weights)  # a plan's operands through the op
    z_general = multihead_logits(hidden, heads, weights)  # no plan: one-off, never merged
    for z in (z_plan, z_op, z_general):
        assert rel_err(z, ref) <= TOL[dtype]
    # fp32 accumulation, one rounding to the heads' dtype (the interpreter truncates: one ulp).
    ulp = {torch.float32: 2**-22, torch.bfloat16: 2**-7}[dtype]
    for u in range(len(plan.rows)):
        head64 = torch.einsum("h,hvd->vd", plan.rows[u].double(), heads.double().cpu())
        size = torch.einsum("h,hvd->vd", plan.rows[u].double().abs(), heads.double().abs().cpu())
        assert ((plan.mixed_head(u).cpu().double() - head64).abs() <= ulp * size).all()
    if dtype == torch.float32:
        assert rel_err(z_plan, z_general.double()) <= 1e-5
        for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=4)):
            tokens, logprobs = multihead_sample(hidden, heads, weights, **kw)
            fast = multihead.multihead_sample(hidden, heads, weights, plan=plan, **kw)
            assert torch.equal(tokens, fast[0])  # same Philox numbers per (row, token)
            torch.testing.assert_close(logprobs, fast[1], atol=1e-5, rtol=0)


@needs_triton
def test_calls_without_a_plan_never_merge(monkeypatch):
    """A one-off plan costs one host read, never a merge (H + U head transfers for one call)."""
    import triton_kernels.multihead.heads_plan as heads_plan

    def no_merge(*args):
        raise AssertionError("a call without a plan merged heads")

    monkeypatch.setattr(heads_plan, "merge_heads", no_merge)
    hidden, heads, weights = shared_weight_inputs()
    ref = logits64(hidden, heads, weights)
    assert rel_err(multihead_logits(hidden, heads, weights), ref) <= 1e-5
    assert torch.equal(multihead_sample(hidden, heads, weights, temperature=0.0)[0],
                       ref.argmax(dim=1))


@needs_triton
def test_stale_plans_are_refused_and_the_cache_follows_the_heads():
    """A plan binds the values of its heads and weights: after an in-place change it is refused
    (never silently stale); a plan rebuilt through the owner's cache merges the new values."""
    hidden, heads, weights = shared_weight_inputs()
    cache = MergeCache(1 << 30)
    plan = plan_heads(heads, weights, cache=cache)
    sampling = SamplingPlan(heads, weights, temperature=0.0, plan=plan)
    assert plan_heads(heads, weights, cache=cache).heads is plan.heads and cache.merges == 1
    changes = (lambda: heads.mul_(-2.0),  # new version of the same heads tensor
               lambda: weights.copy_(weights.flip(1)))  # same weights tensor, new values
    for change in changes:
        change()
        assert not plan.is_current()
        for stale_call in (lambda: sampling(hidden),
                           lambda: multihead.multihead_logits(hidden, heads, weights, plan=plan)):
            with pytest.raises(ValueError, match="stale"):
                stale_call()
        plan = plan_heads(heads, weights, cache=cache)
        assert rel_err(multihead.multihead_logits(hidden, heads, weights, plan=plan),
                       logits64(hidden, heads, weights)) <= 1e-5
    assert cache.merges == 3  # each change merged anew
    with pytest.raises(ValueError, match="built for"):
        multihead.multihead_logits(hidden, heads.clone(), weights, plan=plan)


@needs_triton
def test_merge_cache_is_bounded_and_warns_over_budget(caplog):
    hidden, heads, weights = shared_weight_inputs()
    one_set = 2 * heads.shape[1] * heads.shape[2] * heads.element_size()  # U = 2 merged heads
    cache = MergeCache(one_set)
    plan_heads(heads, weights, cache=cache)
    other = weights.flip(1).contiguous()
    plan = plan_heads(heads, other, cache=cache)
    assert plan.merged
    assert rel_err(multihead.multihead_logits(hidden, heads, other, plan=plan),
                   logits64(hidden, heads, other)) <= 1e-5
    assert cache.merges == 2 and cache.nbytes <= one_set
    small = MergeCache(one_set - 1)
    with caplog.at_level(logging.WARNING, logger="triton_kernels.multihead.merge"):
        plan = plan_heads(heads, weights, cache=small)
    assert "merge cache budget" in caplog.text and small.merges == 0 and not plan.merged
    assert rel_err(multihead.multihead_logits(hidden, heads, weights, plan=plan),
                   logits64(hidden, heads, weights)) <= 1e-5
    assert not plan_heads(heads, weights, cache=MergeCache(0)).merged  # budget 0: never merge
    with pytest.raises(ValueError, match="max_bytes"):
        MergeCache(-1)


@needs_triton
def test_merge_shared_heads_gives_capturable_inputs():
    hidden, heads, weights = shared_weight_inputs()
    heads_eff, weights_eff = merge_shared_heads(heads, weights)
    assert heads_eff.shape == (2, 300, 40) and weights_eff.shape == (6, 2)
    assert rel_err(multihead_logits(hidden, heads_eff, weights_eff),
                   logits64(hidden, heads, weights)) <= 1e-5


# ----------------------------------------------------------------------------------- checks and dispatch


def _bad(name):
    hidden, heads, weights = make_inputs(3, 2, 50, 8)
    kw = dict(hidden=hidden, heads=heads, weights=weights)
    if name == "hidden":
        kw["hidden"] = hidden[:, :5]
    elif name == "heads":
        kw["heads"] = heads.to(torch.float16)
    elif name == "weights":
        kw["weights"] = weights[:, :1]
    elif name == "finite":
        kw["weights"] = weights.clone().index_fill_(1, torch.tensor([1], device=DEVICE), float("inf"))
    elif name == "int_weights":
        kw["weights"] = weights.long()
    return kw


@pytest.mark.parametrize("name,match", [
    ("hidden", "hidden size 8"), ("heads", "heads dtype torch.float16"),
    ("weights", r"weights must have shape \[B, H\]"), ("finite", "weights must be finite, got inf"),
    ("int_weights", "weights must be a floating-point"),
])
def test_bad_inputs_raise_value_error(name, match):
    kw = _bad(name)
    for fn in (multihead_logits, multihead_sample):
        with pytest.raises(ValueError, match=match):
            fn(kw["hidden"], kw["heads"], kw["weights"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=-1), r"top_k must be an int >= 0 .*-1"), (dict(top_k=2.5), "top_k.*2.5"),
    (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p .*1.5"), (dict(top_p=float("nan")), "top_p .*nan"),
    (dict(min_p=-0.1), r"min_p must be a finite number in \[0, 1\], got -0.1"),
    (dict(min_p=float("inf")), "min_p .*inf"), (dict(min_p="0.1"), "min_p must be a real number"),
    (dict(top_p=torch.ones(4)), r"top_p tensor must be float32 of shape \[\], \[1\] or \[3\]"),
    (dict(min_p=torch.ones(3, dtype=torch.float64)), "min_p tensor must be float32"),
    (dict(temperature=-0.5), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature"), (dict(seed=-3), r"seed must be in \[0, 2\*\*63\)"),
    (dict(offset=torch.zeros(2, dtype=torch.int64)), "offset tensor must be int64 with one element"),
    (dict(seed=torch.zeros(1, dtype=torch.int32)), "seed tensor must be int64"),
    (dict(temperature=torch.ones(3, dtype=torch.float64)), "temperature tensor must be float32"),
    (dict(temperature=torch.ones(4)), r"shape \[\], \[1\] or \[3\] .* got .* shape \[4\]"),
    (dict(temperature=torch.ones(3, 1)), r"shape \[3, 1\]"),
    (dict(temperature="0.5"), "temperature must be a real number or a float32 tensor"),
])
def test_bad_sampling_arguments_raise_value_error(kwargs, match):
    hidden, heads, weights = make_inputs(3, 2, 50, 8)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        multihead_sample(hidden, heads, weights, **kwargs)


@pytest.mark.parametrize("sample", [multihead_sample, reference.multihead_sample])
def test_temperature_tensor_on_another_device_raises_value_error(sample):
    hidden, heads, weights = make_inputs(3, 2, 50, 8)
    match = f"temperature tensor must be .* on {DEVICE}, got .* on meta"
    with pytest.raises(ValueError, match=match):
        sample(hidden, heads, weights, temperature=torch.ones(3, device="meta"))


def test_bad_out_raises_value_error():
    hidden, heads, weights = make_inputs(3, 2, 50, 8)
    with pytest.raises(ValueError, match=r"out must be float32 \[3, 50\]"):
        multihead_logits(hidden, heads, weights, out=torch.empty(3, 49, device=DEVICE))


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CPU dispatch rule")
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_cpu_dispatch_follows_triton_interpret(monkeypatch, interpret):
    if interpret == "1" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels are built for the interpreter only when TRITON_INTERPRET=1 at import")
    hidden, heads, weights = make_inputs(3, 2, 50, 8)
    calls = []
    marker = torch.full((3, 50), 7.0)  # a tensor: the call goes through torch.ops.mahalo
    monkeypatch.setattr(cpu, "multihead_logits", lambda *a, **k: calls.append(a) or marker)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    z = triton_kernels.multihead_logits(hidden, heads, weights)
    if interpret == "0":
        assert torch.equal(z, marker) and len(calls) == 1
    else:
        assert not calls and rel_err(z, logits64(hidden, heads, weights)) <= 1e-5


# ----------------------------------------------------------------------------------- plans


@pytest.mark.parametrize("top_k", [0, 1, 5])
def test_sampling_plan_equals_the_launcher_and_reads_offset_on_device(top_k):
    """A plan binds everything but hidden: same results as the launcher, call after call, with
    the offset advanced in place between calls (and the merged-heads path for shared rows)."""
    hidden, heads, weights = make_inputs(6, 3, 90, 16, scale=3.0)
    offset = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    temps = torch.tensor([0.7, 0.0, 1.2, 1.0, 0.9, 2.0], device=DEVICE)
    for w, merged in ((weights, False), (weights[:1].expand(6, 3).contiguous(), True)):
        plan = triton_kernels.SamplingPlan(heads, w, temperature=temps, top_k=top_k, seed=4,
                                           offset=offset)
        assert plan.heads_plan.merged == merged
        got, want = [], []
        for _ in range(3):
            got.append(plan(hidden))  # each call's outputs stay valid after the next call
            # The launcher on the plan's operands (merged heads when rows share weights).
            want.append(multihead_sample(hidden, plan.heads, plan.weights, temperature=temps,
                                         top_k=top_k, seed=4, offset=offset))
            offset.add_(1)
        for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):
            assert torch.equal(tokens, want_tokens)
            torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=1e-6)


def test_sampling_plan_checks_hidden():
    hidden, heads, weights = make_inputs(4, 2, 50, 8)
    plan = triton_kernels.SamplingPlan(heads, weights, temperature=0.0)
    with pytest.raises(ValueError, match=r"hidden must be torch.float32 of shape \[4, 8\]"):
        plan(hidden[:3])
