"""Engine(cache_layout="shared_prefix") against the fork layout and independent references:
greedy generation (identical candidates must each equal it), a fixed-seed sampled search (the
same random stream per candidate slot in both layouts), PRM step scores against full re-encodes
(`prm.score_full`), and the KV bytes allocated against the layout's formula. A value-model PRM
follows the policy into the shared layout (its own prefix slot + K candidate slots, cascade
extend attention): searches with it equal the fork layout's on every family."""
import math

import pytest
import torch
from transformers import AutoTokenizer

from mahalo_engine.engine import Engine, SearchConfig
from mahalo_engine.layouts import SharedPrefixCache, slot_layout
from mahalo_engine.policy import load_policy
from mahalo_engine.value_model import ValueHead, ValueModel, load_prm, save_prm
from mahalo_engine.tiny import FAMILIES, tiny_checkpoint
from mahalo_engine.models.loader import load_decoder

PROMPTS = ["Question: How many clips", "The quick brown fox jumps over", "Step 1:"]
K = 3


def _last_candidate(prompts, responses):
    """Scores 0, 10, 20, ... by candidate index: the last candidate always wins (a promote
    from a non-first slot)."""
    return [10.0 * (i % K) for i in range(len(responses))]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_search_is_identical_between_layouts(family):
    policy = load_policy(tiny_checkpoint(family), dtype=torch.float32)
    cfg = SearchConfig(candidates=K, temperature=0, boundary=" ", max_new_tokens=10, max_steps=50,
                       check_every=2, scorer=_last_candidate)
    # 3 requests over 2 groups: a group is reused and the last request moves down.
    runs = {layout: Engine(policy, max_batch=2, max_seq_len=64, cache_layout=layout)
            for layout in ("fork", "shared_prefix")}
    gens = runs["fork"].generate(PROMPTS, temperature=0, max_new_tokens=10)
    fork, shared = (runs[layout].search(PROMPTS, config=cfg) for layout in runs)
    assert shared == fork
    for gen, res in zip(gens, shared):
        assert res.token_ids == gen.token_ids


def test_fixed_seed_sampled_search_is_identical_between_layouts():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    cfg = SearchConfig(candidates=K, temperature=1.0, top_k=20, boundary=" ", max_steps=4,
                       max_step_tokens=6, check_every=2, seed=5,
                       scorer=lambda p, r: [float(len(x) % 7) for x in r])
    fork, shared = (Engine(policy, max_batch=2, max_seq_len=64, cache_layout=layout)
                    .search(PROMPTS, config=cfg) for layout in ("fork", "shared_prefix"))
    assert shared == fork
    assert any(len(set(s.candidate_scores)) > 1 for r in shared for s in r.steps)


def test_step_scores_equal_full_rescoring_in_shared_layout(tmp_path):
    ckpt = tiny_checkpoint("qwen2")
    policy = load_policy(ckpt, dtype=torch.float32)
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    backbone = tiny_checkpoint("qwen2", seed=1)
    save_prm(tmp_path / "prm", load_decoder(backbone, dtype=torch.float32),
             ValueHead(policy.config.hidden_size), "value", AutoTokenizer.from_pretrained(backbone))
    prm = load_prm(tmp_path / "prm", dtype=torch.float32)
    engine = Engine(policy, prm=prm, max_batch=3, max_seq_len=96, cache_layout="shared_prefix")
    cfg = SearchConfig(candidates=K, boundary=" ", max_steps=3, max_step_tokens=8, seed=3,
                       check_every=2)
    for prompt, res in zip(PROMPTS, engine.search(PROMPTS, config=cfg)):
        committed = policy.tokenizer.encode(prompt)
        for step in res.steps:
            committed += step.token_ids
            assert abs(step.score - prm.score_full([committed]).item()) < 1e-4
            assert step.score == max(step.candidate_scores)
    # KV bytes: max_batch * (max_seq_len + 1 + K * (max_step_tokens + 1)) positions.
    c = policy.config
    per_pos = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    allocated = engine.cache.prefix.data.nbytes + engine.cache.suffix.data.nbytes
    assert allocated == 3 * (96 + 1 + K * (8 + 1)) * per_pos


@pytest.fixture
def eager_cpu(monkeypatch):
    """The engine's CPU path (torch sampling and the CPU cascade attention) instead of Triton's
    interpreter, which takes minutes per search; these tests compare layouts, and the kernels
    have their own tests against the references."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (CI runs two test workers)
    yield
    torch.set_num_threads(threads)


def _value_prm(family: str) -> ValueModel:
    """A value-model PRM on another seed's backbone of ``family``, with the policy's tokenizer
    (so it takes the policy's token ids and can share the layout)."""
    backbone = tiny_checkpoint(family, seed=1)
    model = load_decoder(backbone, dtype=torch.float32)
    torch.manual_seed(0)
    return ValueModel(model, ValueHead(model.config.hidden_size), "value",
                      AutoTokenizer.from_pretrained(backbone)).eval()


def _assert_same_search(shared, fork):
    """Same tokens, winners, texts and end reasons; scores equal up to float32 summation order
    (cascade attention merges two partial softmaxes)."""
    assert [r.token_ids for r in shared] == [r.token_ids for r in fork]
    assert [r.finish_reason for r in shared] == [r.finish_reason for r in fork]
    for a, b in zip(shared, fork):
        assert len(a.steps) == len(b.steps)
        for x, y in zip(a.steps, b.steps):
            assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
            torch.testing.assert_close(torch.tensor(x.candidate_scores),
                                       torch.tensor(y.candidate_scores), rtol=1e-4, atol=1e-5)


def _prm_searches(family: str, **kw) -> None:
    policy = load_policy(tiny_checkpoint(family), dtype=torch.float32)
    prm = _value_prm(family)
    engines = {layout: Engine(policy, prm=prm, max_batch=2, max_seq_len=64, cache_layout=layout)
               for layout in ("fork", "shared_prefix")}
    cfg = SearchConfig(candidates=K, boundary=" ", max_steps=4, max_step_tokens=6,
                       check_every=2, **kw)
    fork, shared = (engines[layout].search(PROMPTS, config=cfg) for layout in engines)
    _assert_same_search(shared, fork)
    assert isinstance(engines["shared_prefix"].prm.cache, SharedPrefixCache)
    assert not isinstance(engines["fork"].prm.cache, SharedPrefixCache)
    return shared


@pytest.mark.parametrize("family", FAMILIES)
def test_prm_in_shared_layout_equals_fork_greedy(family, eager_cpu):
    _prm_searches(family, temperature=0)


def test_prm_in_shared_layout_equals_fork_fixed_seed_sampled(eager_cpu):
    shared = _prm_searches("qwen2", temperature=1.0, top_k=20, seed=5)
    # The candidates differ, so the PRM's scores (not a tie) picked the winners.
    assert any(len(set(s.candidate_scores)) > 1 for r in shared for s in r.steps)


def test_prm_step_scores_equal_full_rescoring_in_shared_layout(eager_cpu):
    """Every candidate's score (winners and losers, across promotes, group reuse and a move)
    equals re-encoding committed text + candidate from scratch; the PRM's KV bytes follow the
    shared formula."""
    policy = load_policy(tiny_checkpoint("llama"), dtype=torch.float32)
    prm = _value_prm("llama")
    engine = Engine(policy, prm=prm, max_batch=2, max_seq_len=80, cache_layout="shared_prefix")
    cfg = SearchConfig(candidates=K, boundary=" ", max_steps=3, max_step_tokens=7, seed=11,
                       temperature=1.0, check_every=2)
    for prompt, res in zip(PROMPTS, engine.search(PROMPTS, config=cfg)):
        committed = policy.tokenizer.encode(prompt)
        for step in res.steps:
            assert len(step.candidate_scores) == K
            committed += step.token_ids
            assert abs(step.score - prm.score_full([committed]).item()) < 1e-4
    cache = engine.prm.cache
    assert isinstance(cache, SharedPrefixCache) and cache.k == K
    c = prm.config
    per_pos = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    assert cache.prefix.data.nbytes + cache.suffix.data.nbytes == 2 * (80 + K * (7 + 1)) * per_pos
    prepared = engine.prm.cache_nbytes(2 * K, 80, policy, slot_layout("shared_prefix", K, 8))
    assert prepared == 0  # nothing new to allocate


def test_unknown_layout_is_named():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    with pytest.raises(ValueError, match="cache_layout must be one of"):
        Engine(policy, cache_layout="paged")


@pytest.mark.gpu
def test_shared_prefix_with_cuda_graphs_equals_fork_eager():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    for kw in (dict(temperature=0, scorer=_last_candidate),
               dict(temperature=1.0, top_k=20, seed=3,
                    scorer=lambda p, r: [float(len(x) % 7) for x in r])):
        cfg = SearchConfig(candidates=K, boundary=" ", max_steps=4, max_step_tokens=8,
                           check_every=2, **kw)
        graphs = Engine(policy, max_batch=2, max_seq_len=96, cache_layout="shared_prefix",
                        cuda_graphs=True).search(PROMPTS, config=cfg)
        eager = Engine(policy, max_batch=2, max_seq_len=96, cache_layout="fork",
                       cuda_graphs=False).search(PROMPTS, config=cfg)
        assert [r.token_ids for r in graphs] == [r.token_ids for r in eager]


@pytest.mark.gpu
def test_prm_in_shared_layout_on_cuda_equals_fork_eager():
    """On CUDA the PRM's extend runs the Triton cascade extend kernel: same search as the fork
    layout without graphs (float32), scores equal up to summation order."""
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    prm = _value_prm("qwen2").to("cuda")
    cfg = SearchConfig(candidates=K, boundary=" ", max_steps=4, max_step_tokens=8, check_every=2,
                       temperature=1.0, top_k=20, seed=3)
    shared = Engine(policy, prm=prm, max_batch=2, max_seq_len=96, cache_layout="shared_prefix",
                    cuda_graphs=True).search(PROMPTS, config=cfg)
    fork = Engine(policy, prm=prm, max_batch=2, max_seq_len=96, cache_layout="fork",
                  cuda_graphs=False).search(PROMPTS, config=cfg)
    _assert_same_search(shared, fork)
