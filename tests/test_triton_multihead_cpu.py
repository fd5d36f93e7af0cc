"""The engine's CPU sampling path (triton_kernels.multihead.cpu) against the readable spec (reference).

Tokens must be identical (same logits, mask, softmax and generator draw), log-probs equal to fp32
rounding; the shared-weights plan must apply on CPU (merged heads) and the top-k mask must break
ties at the threshold like the reference's stable sort.
"""
import math

import pytest
import torch

from triton_kernels import MergeCache, plan_heads, reference
from triton_kernels.multihead import cpu


def make_inputs(B, H, V, d, *, seed=0, scale=3.0, shared=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, d, generator=g)
    heads = torch.randn(H, V, d, generator=g) * (scale / math.sqrt(d))
    weights = torch.rand(1 if shared else B, H, generator=g) + 0.1
    return hidden, heads, weights.expand(B, H).contiguous() if shared else weights


def assert_same(got, want):
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("top_k", [0, 1, 7, 128])  # 128 > V: no truncation
@pytest.mark.parametrize("temperature", [0.0, 0.7, "rows", "mixed", "zeros"])
def test_general_path_equals_reference(temperature, top_k):
    B, V = 5, 120
    hidden, heads, weights = make_inputs(B, 3, V, 24, seed=top_k)
    temp = {"rows": torch.tensor([0.5, 1.0, 2.0, 0.8, 1.3]),
            "mixed": torch.tensor([0.0, 1.0, 0.0, 0.8, 1.3]),
            "zeros": torch.zeros(1)}.get(temperature, temperature)
    for offset in range(12):  # several draws: every row's token must match every time
        kw = dict(temperature=temp, top_k=top_k, seed=3, offset=offset)
        assert_same(cpu.multihead_sample(hidden, heads, weights, **kw),
                    reference.multihead_sample(hidden, heads, weights, **kw))


@pytest.mark.parametrize("filters", [dict(top_p=0.8), dict(min_p=0.1), dict(top_p=0.6, min_p=0.2),
                                     dict(top_p=torch.tensor([1.0, 0.3, 0.9, 0.5, 0.7]),
                                          min_p=torch.tensor([0.0, 0.0, 0.3, 0.05, 0.5]))])
@pytest.mark.parametrize("top_k", [0, 7, 119])  # 119 < V = 120: a top-k that keeps almost all
@pytest.mark.parametrize("temperature", [0.7, "mixed"])
def test_top_p_and_min_p_equal_reference(temperature, top_k, filters):
    B, V = 5, 120
    hidden, heads, weights = make_inputs(B, 3, V, 24, seed=top_k)
    temp = torch.tensor([0.0, 1.0, 0.6, 0.8, 1.3]) if temperature == "mixed" else temperature
    for offset in range(12):
        kw = dict(temperature=temp, top_k=top_k, seed=3, offset=offset, **filters)
        assert_same(cpu.multihead_sample(hidden, heads, weights, **kw),
                    reference.multihead_sample(hidden, heads, weights, **kw))


def test_filters_on_minus_inf_logits_equal_reference():
    """-inf logits (a masked vocabulary) are never drawn, with or without filters, and the
    masks agree with the reference's."""
    z = torch.randn(4, 50)
    z[:, 10:] = float("-inf")
    z[1, :9] = float("-inf")  # one finite token left in row 1
    for kw in (dict(), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=20, top_p=0.9, min_p=0.01)):
        for offset in range(6):
            tokens, logprobs = cpu.sample_logits(z, temperature=1.0, top_k=kw.get("top_k", 0),
                                                 top_p=kw.get("top_p", 1.0),
                                                 min_p=kw.get("min_p", 0.0), seed=1, offset=offset)
            assert tokens.lt(10).all() and tokens[1] == 9 and torch.isfinite(logprobs).all()
            keep = reference.filter_mask(z, kw.get("top_k", 0), kw.get("top_p", 1.0),
                                         kw.get("min_p", 0.0))
            assert keep.gather(1, tokens[:, None]).all()


@pytest.mark.parametrize("top_k", [0, 4])
def test_shared_weights_use_merged_heads(top_k):
    hidden, heads, weights = make_inputs(6, 3, 131, 16, shared=True, seed=1)
    cache = MergeCache(1 << 30)
    plan = plan_heads(heads, weights, cache=cache)
    assert plan.heads.shape[0] == 1 and cache.merges == 1
    for offset in range(8):
        kw = dict(temperature=0.9, top_k=top_k, seed=11, offset=offset)
        assert_same(cpu.multihead_sample(hidden, heads, weights, plan=plan, **kw),
                    reference.multihead_sample(hidden, plan.heads, plan.weights, **kw))
    assert plan_heads(heads, weights, cache=cache).heads is plan.heads
    assert cache.merges == 1  # the cached merge was reused, not recomputed
    z64 = torch.einsum("bh,hvd,bd->bv", weights.double(), heads.double(), hidden.double())
    for z in (cpu.multihead_logits(hidden, heads, weights, plan=plan),
              cpu.multihead_logits(hidden, heads, weights)):  # no plan: the general path
        assert ((z.double() - z64).abs().max() / z64.abs().max()).item() < 1e-5


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 6])
def test_top_k_mask_breaks_ties_like_reference(top_k):
    # Row 0: a run of equal values straddling the threshold; row 1: all equal; row 2: no ties.
    scaled = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, 2.0],
                           [4.0] * 8,
                           [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4]])
    assert torch.equal(cpu.top_k_mask(scaled, top_k), reference.top_k_mask(scaled, top_k))


def test_top_k_ties_in_sampling_equal_reference():
    hidden, heads, weights = make_inputs(4, 2, 40, 8, seed=5)
    # Eleven vocabulary entries with the same (large) logit: top-6 must cut inside the tie.
    heads[:, 20:30] = heads[:, 3:4] = hidden.mean(0)
    z = reference.multihead_logits(hidden, heads, weights)
    assert bool((z[:, 20:30] == z[:, 3:4]).all()) and bool((z.argmax(-1) == 3).any())
    for offset in range(10):
        kw = dict(temperature=1.0, top_k=6, seed=2, offset=offset)
        assert_same(cpu.multihead_sample(hidden, heads, weights, **kw),
                    reference.multihead_sample(hidden, heads, weights, **kw))


def test_greedy_is_argmax_of_float64_logits():
    hidden, heads, weights = make_inputs(7, 2, 300, 32, seed=9)
    z64 = torch.einsum("bh,hvd,bd->bv", weights.double(), heads.double(), hidden.double())
    tokens, logprobs = cpu.multihead_sample(hidden, heads, weights, temperature=0.0)
    assert torch.equal(tokens, z64.argmax(-1))
    want = torch.log_softmax(z64, -1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs.double(), want, rtol=0, atol=1e-5)


def test_rejects_non_cpu_tensors():
    hidden, heads, weights = make_inputs(2, 2, 10, 4)
    with pytest.raises(ValueError, match="hidden must have shape"):
        cpu.multihead_sample(hidden[0], heads, weights)
    with pytest.raises(ValueError, match="runs on CPU tensors, got hidden on meta"):
        cpu.multihead_sample(hidden.to("meta"), heads.to("meta"), weights.to("meta"),
                             temperature=0.0)
