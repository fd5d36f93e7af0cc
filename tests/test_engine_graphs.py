"""The engine's CUDA graphs against its eager path (GPU only; the CPU runs the eager path).

Complements ``test_engine.py::test_cuda_graphs_match_eager`` (fp32, the basic replay) with the
cases a first GPU run must settle: bf16, a slot bucket wider than the live slots, the LRU's
eviction and re-capture, and heads updated in place under a merged-heads graph.
"""
import pytest
import torch

from mahalo_engine.engine import Engine
from mahalo_engine.engine import graphs as graphs_module
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.tiny import tiny_checkpoint

pytestmark = pytest.mark.gpu
PROMPTS = ["Question: How many clips", "The quick brown fox jumps over", "Step 1:",
           "Once upon a time", "2 + 2 ="]


def _pair(policy, **kw):
    return (Engine(policy, cuda_graphs=True, **kw), Engine(policy, cuda_graphs=False, **kw))


def _two_heads(policy, scale=0.05, seed=0):
    noise = torch.randn(policy.heads.shape[1:], generator=torch.Generator().manual_seed(seed))
    heads = torch.cat([policy.heads, policy.heads + scale * noise.to(policy.heads)])
    return Policy(policy.model, policy.tokenizer, heads, ["acc", "eng"])


def _tokens(gens):
    return [g.token_ids for g in gens]


# What must match between graph and eager runs. A graph runs its slot bucket's row count (8 rows
# for 5 live slots), eager the live count, and cuBLAS picks its GEMM kernel per shape: fp32 logits
# then differ in summation order, ~1e-6 relative. So the tokens (text, finish reason) must be
# equal: greedy, and sampling with the same seed (the same noise); a flip would need a top-2
# margin below ~1e-5, which these prompts on the tiny checkpoint do not have. Log-probs must agree
# within FP32_LOGPROB_TOL, two orders of magnitude above that rounding and far below what a graph
# bug (a stale buffer, a wrong slot, a padding row leaking) produces.
FP32_LOGPROB_TOL = 1e-4


def assert_same_generations(graphs, eager, tol=FP32_LOGPROB_TOL):
    assert [(g.text, g.token_ids, g.finish_reason) for g in graphs] == \
        [(g.text, g.token_ids, g.finish_reason) for g in eager]
    worst = max((abs(x - y) for a, b in zip(graphs, eager)
                 for x, y in zip(a.logprobs, b.logprobs, strict=True)), default=0.0)
    assert worst <= tol, f"log-probs differ by {worst:.3g} > {tol:g}"


def test_bf16_graphs_match_eager():
    # Four prompts in four slots: the graph runs the same row count as eager, so the same GEMMs.
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.bfloat16, device="cuda")
    graphs, eager = _pair(policy, max_batch=4, max_seq_len=128)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=5)):
        a = graphs.generate(PROMPTS[:4], max_new_tokens=40, **kw)
        b = eager.generate(PROMPTS[:4], max_new_tokens=40, **kw)
        assert _tokens(a) == _tokens(b)
        for ga, gb in zip(a, b):
            assert max(abs(x - y) for x, y in zip(ga.logprobs, gb.logprobs)) <= 1e-2
    assert graphs._runner.capture_seconds, "no graph was captured"


def test_slot_bucket_wider_than_live_slots_changes_nothing():
    # Five live slots run in a bucket of eight: the three padding slots are paused rows whose
    # samples and cache writes must not leak into the live ones.
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    graphs, eager = _pair(policy, max_batch=8, max_seq_len=96)
    assert graphs._prepare(8, None).bucket(5) == 8
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=10, seed=2)):
        assert_same_generations(graphs.generate(PROMPTS, max_new_tokens=16, **kw),
                                eager.generate(PROMPTS, max_new_tokens=16, **kw))
    assert {key[0] for key in graphs._runner._graphs} == {8}


def test_graph_eviction_past_the_cache_limit(monkeypatch):
    monkeypatch.setattr(graphs_module, "MAX_GRAPHS", 2)
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    graphs, eager = _pair(policy, max_batch=8, max_seq_len=200)
    # Slot buckets 1, 2, 4, 8 and kv buckets 64, 128: far more keys than the LRU holds.
    for n in (1, 2, 4, 5, 1, 2):
        kw = dict(max_new_tokens=90, temperature=0)
        assert_same_generations(graphs.generate(PROMPTS[:n], **kw),
                                eager.generate(PROMPTS[:n], **kw))
        assert len(graphs._runner._graphs) <= 2
    # The first keys were evicted and captured again: more captures than keys held.
    assert len(graphs._runner.capture_seconds) > 4


def test_merged_heads_graph_sees_heads_updated_in_place():
    base = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    policy = _two_heads(base)
    graphs, eager = _pair(policy, max_batch=3, max_seq_len=96)
    kw = dict(head_weights=[0.3, 0.7], max_new_tokens=16, temperature=0)  # shared: merged path
    before = graphs.generate(PROMPTS[:3], **kw)
    assert_same_generations(before, eager.generate(PROMPTS[:3], **kw))
    other = _two_heads(load_policy(tiny_checkpoint("qwen2", seed=3), dtype=torch.float32,
                                   device="cuda"), seed=1)
    with torch.no_grad():
        policy.heads.copy_(other.heads)  # a trainer's new weights, written in place
    after = graphs.generate(PROMPTS[:3], **kw)
    assert_same_generations(after, eager.generate(PROMPTS[:3], **kw))
    assert _tokens(after) != _tokens(before)  # the update changed the answer: the check has teeth
