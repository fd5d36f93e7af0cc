"""The engine inside someone else's loop (issue 13, item 2): built from in-memory objects with the
weights shared, `update_weights` after real MAH-DPO steps (against a freshly loaded engine), no
process-global side effects, and the KV memory budget (against sizes worked out by hand)."""
import json

import pytest
import torch

from mahalo_engine.engine import Engine, SearchConfig
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.value_model import ValueHead, ValueModel
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder

PROMPTS = ["Question: 3 + 7 = ?\nAnswer:", "The quick brown fox"]
L, N_KV, HD, BYTES = 2, 2, 16, 4  # the tiny checkpoints' layers, kv heads, head dim; fp32


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _greedy(engine, **kw):
    return engine.generate(PROMPTS, temperature=0, max_new_tokens=6, **kw)


def _heads(decoder, h=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = decoder.lm_head.weight.detach()
    return torch.stack([base + 0.05 * torch.randn(base.shape, generator=gen, dtype=base.dtype)
                        for _ in range(h)])


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint("qwen2")


# -- in-memory construction, shared weights ------------------------------------------------------

def test_from_models_shares_a_decoder_and_heads(ckpt):
    decoder = load_decoder(ckpt, dtype=torch.float32)
    heads = _heads(decoder)
    engine = Engine.from_models(decoder, _tok(ckpt), heads, max_batch=3, max_seq_len=64)
    assert engine.policy.model is decoder and engine.policy.objectives == ["head0", "head1"]
    assert engine.policy.heads.data_ptr() == heads.data_ptr()
    before = _greedy(engine, head_weights=[1.0, 0.0])
    # The independent reference: an engine over copies of the weights (nothing shared).
    copy = load_decoder(ckpt, dtype=torch.float32)
    ref = Engine(Policy(copy, _tok(ckpt), heads.clone(), ["a", "b"]), max_batch=3, max_seq_len=64)
    assert [g.token_ids for g in before] == [g.token_ids for g in _greedy(ref, head_weights=[1, 0])]
    # An in-place change of the caller's tensors is what the engine samples from next.
    with torch.no_grad():
        heads[0].copy_(_heads(decoder, h=1, seed=7)[0] * 3)
        decoder.model.norm.weight.mul_(1.5)
    after = _greedy(engine, head_weights=[1.0, 0.0])
    with torch.no_grad():
        copy.model.norm.weight.mul_(1.5)
    ref = Engine(Policy(copy, _tok(ckpt), heads.clone(), ["a", "b"]), max_batch=3, max_seq_len=64)
    assert [g.token_ids for g in after] == [g.token_ids for g in _greedy(ref, head_weights=[1, 0])]
    assert [g.logprobs for g in after] != [g.logprobs for g in before]


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "mistral"])
def test_from_models_shares_a_transformers_model(family):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(family, tie_word_embeddings=family == "llama")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.train()  # the caller's mode must survive
    engine = Engine.from_models(hf, _tok(path), max_batch=2, max_seq_len=48)
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for name, p in engine.policy.model.named_parameters(remove_duplicate=False):
        assert p is theirs[name], name
    assert engine.policy.heads.data_ptr() == hf.lm_head.weight.data_ptr() and hf.training
    with torch.no_grad():  # a trainer's in-place step, seen by both
        for p in hf.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    hf.eval()
    ids = engine.tokenizer.encode(PROMPTS[0])
    (gen,) = engine.generate([ids], temperature=0, max_new_tokens=8)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert gen.token_ids == ref[0, len(ids):].tolist()
    if family == "qwen2":  # a PRM over a transformers backbone shares it the same way
        prm = ValueModel(hf, _value_head(engine.policy.model, "cpu"), "value", engine.tokenizer)
        assert prm.model.model.norm.weight is hf.model.norm.weight
        full = prm.score_full([ids])
        h = hf.model(torch.tensor([ids])).last_hidden_state[0, -1]
        assert torch.allclose(full, prm.value_head(h.float()).float().reshape(-1), atol=1e-5)


def test_from_models_rejects_what_cannot_be_shared(ckpt):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        Engine.from_models(gpt2, _tok(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    hf.model.norm.to(torch.bfloat16)
    with pytest.raises(ValueError, match="one dtype and device"):
        Engine.from_models(hf, _tok(ckpt))
    decoder = load_decoder(ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"heads are torch.float64 .* the model is torch.float32"):
        Engine.from_models(decoder, _tok(ckpt), _heads(decoder).double())
    decoder.lm_head = None  # as the MAH-DPO trainer leaves it
    with pytest.raises(ValueError, match="no lm_head"):
        Engine.from_models(decoder, _tok(ckpt))


# -- update_weights ------------------------------------------------------------------------------

def _pairs(tmp_path):
    acc, eng = [], []
    for i in range(4):
        a, b = 3 + 5 * i, 7 + 2 * i
        prompt = f"Question: {a} + {b} = ?\nAnswer:"
        acc.append({"prompt": prompt, "chosen": f" {a + b}", "rejected": f" {a + b + 1}"})
        eng.append({"prompt": prompt, "chosen": " Well done!", "rejected": f" {a + b}."})
    for name, rows in (("acc", acc), ("eng", eng)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "acc.jsonl", tmp_path / "eng.jsonl"


def _pointers(engine):
    cache = engine.cache
    tensors = [cache.data, cache.lens] if hasattr(cache, "data") else \
        [cache.prefix.data, cache.prefix.lens, cache.suffix.data, cache.suffix.lens]
    tensors += [engine.policy.heads, *engine.policy.model.state_dict().values()]
    return (id(engine._runner), id(engine._sampler), [t.data_ptr() for t in tensors])


def test_update_weights_after_mah_dpo_steps_equals_a_fresh_engine(tmp_path, ckpt):
    from training import mah_dpo
    from training.checkpoint import latest_checkpoint, load_checkpoint
    from training.model_io import strip_prefix

    acc, eng = _pairs(tmp_path)
    out = tmp_path / "out"
    mah_dpo.main(["--model", str(ckpt), "--data", f"acc={acc}", "--data", f"eng={eng}", "--out",
                  str(out), "--ref-cache", str(tmp_path / "ref"), "--batch-size", "4", "--lr",
                  "3e-3", "--max-steps", "3"])
    # The engine a sampling loop built before training: the SFT backbone, two heads.
    sft = load_decoder(ckpt, dtype=torch.float32)
    engine = Engine.from_models(sft, _tok(ckpt), _heads(sft), objectives=["acc", "eng"],
                                max_batch=3, max_seq_len=64)
    mixes = [[1.0, 0.0], [0.3, 0.7]]
    before = _greedy(engine, head_weights=mixes)
    pointers = _pointers(engine)

    state, _ = load_checkpoint(latest_checkpoint(out))  # the trainer's own state dict
    engine.update_weights(strip_prefix(state, "decoder."), heads=state["heads"])
    after = _greedy(engine, head_weights=mixes)
    assert _pointers(engine) == pointers  # nothing reallocated: caches, runner, weights

    fresh = Engine(load_policy(out, dtype=torch.float32), max_batch=3, max_seq_len=64)
    ref = _greedy(fresh, head_weights=mixes)
    assert [g.token_ids for g in after] == [g.token_ids for g in ref]
    for a, r in zip(after, ref):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(r.logprobs), atol=1e-5)
    assert [g.logprobs for g in after] != [g.logprobs for g in before]  # training moved them
    # Search over the same engine (shared-prefix layout too) after the update, vs fresh.
    cfg = SearchConfig(candidates=1, max_new_tokens=4, max_step_tokens=2, check_every=2,
                       temperature=0)
    assert [r.token_ids for r in engine.search(PROMPTS, head_weights=[0.5, 0.5], config=cfg)] \
        == [r.token_ids for r in fresh.search(PROMPTS, head_weights=[0.5, 0.5], config=cfg)]


def test_update_weights_from_a_model_keeps_storage(ckpt):
    from transformers import AutoModelForCausalLM

    policy = load_policy(ckpt, dtype=torch.float32)  # its one head is its (untied) lm_head
    engine = Engine(policy, max_batch=3, max_seq_len=64, cache_layout="shared_prefix")
    cfg = SearchConfig(candidates=2, max_new_tokens=4, max_step_tokens=2, check_every=2, seed=6,
                       scorer=lambda ps, rs: [float(len(r)) for r in rs])
    engine.search(PROMPTS, config=cfg)
    pointers = _pointers(engine)
    other = tiny_checkpoint("qwen2", seed=3)
    engine.update_weights(AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32))
    got = engine.search(PROMPTS, config=cfg)
    assert _pointers(engine) == pointers
    fresh = Engine(load_policy(other, dtype=torch.float32), max_batch=3, max_seq_len=64,
                   cache_layout="shared_prefix")
    assert [r.token_ids for r in got] == [r.token_ids for r in fresh.search(PROMPTS, config=cfg)]


@pytest.mark.gpu
def test_update_weights_keeps_cuda_graphs_valid(ckpt):
    policy = load_policy(ckpt, dtype=torch.float32, device="cuda")
    engine = Engine(policy, max_batch=2, max_seq_len=64, cuda_graphs=True)
    mixes = [[1.0], [1.0]]
    _greedy(engine, head_weights=mixes)
    captured, pointers = len(engine._runner.capture_seconds), _pointers(engine)
    other = tiny_checkpoint("qwen2", seed=3)
    engine.update_weights(load_decoder(other, dtype=torch.float32))  # CPU tensors, copied over
    got = _greedy(engine, head_weights=mixes)
    assert _pointers(engine) == pointers
    # The one-head graphs read the weights in place: replayed, not captured again.
    assert len(engine._runner.capture_seconds) == captured
    fresh = Engine(load_policy(other, dtype=torch.float32, device="cuda"), max_batch=2,
                   max_seq_len=64, cuda_graphs=False)
    assert [g.token_ids for g in got] == [g.token_ids for g in _greedy(fresh, head_weights=mixes)]


def test_update_weights_checks_before_writing(ckpt):
    policy = load_policy(ckpt, dtype=torch.float32)
    engine = Engine(policy, max_batch=2, max_seq_len=48)
    state = {k: v.clone() + 1 for k, v in load_decoder(ckpt).state_dict().items()}
    snapshot = {k: v.clone() for k, v in policy.model.state_dict().items()}
    bad = dict(state)
    del bad["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        engine.update_weights(bad)
    with pytest.raises(ValueError, match=r"unexpected \['model.extra'\]"):
        engine.update_weights({**state, "model.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"model.norm.weight: \(3,\)"):
        engine.update_weights({**state, "model.norm.weight": torch.zeros(3)})
    no_head = dict(state)
    del no_head["lm_head.weight"]  # the policy's one head is its lm_head: it would go stale
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        engine.update_weights(no_head)
    with pytest.raises(ValueError, match=r"heads: \(2, 512, 64\), expected \(1, 512, 64\)"):
        engine.update_weights(state, heads=torch.zeros(2, 512, 64))
    for k, v in policy.model.state_dict().items():  # nothing was written by a failed update
        assert torch.equal(v, snapshot[k]), k


# -- no process-global side effects --------------------------------------------------------------

def _engine_calls(ckpt, device="cpu"):
    """The caller's objects (built here, under the caller's settings), and a function making every
    kind of engine call on one engine and returning what they produced."""
    decoder = load_decoder(ckpt, dtype=torch.float32, device=device)
    prm = ValueModel(load_decoder(tiny_checkpoint("qwen2", seed=1), dtype=torch.float32,
                                  device=device), _value_head(decoder, device), "value", _tok(ckpt))
    heads, tok = _heads(decoder), _tok(ckpt)

    def run():
        engine = Engine.from_models(decoder, tok, heads, prm=prm, max_batch=2, max_seq_len=32,
                                    cache_layout="shared_prefix")
        out = [g.token_ids for g in engine.generate(PROMPTS, temperature=0.8, top_k=20, seed=3,
                                                    max_new_tokens=4)]
        cfg = SearchConfig(candidates=2, max_new_tokens=4, max_step_tokens=2, check_every=2, seed=5,
                           selection_temperature=0.5)
        out += [r.token_ids for r in engine.search(PROMPTS, config=cfg)]
        out.append(prm.score_full(out[:2]).tolist())
        engine.update_weights(decoder)
        return out

    return run


def _value_head(decoder, device):
    head = ValueHead(decoder.config.hidden_size).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return head.to(device)


def _process_state(device):
    state = [torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads(),
             torch.get_rng_state()]
    if device == "cuda":
        state += [torch.cuda.current_stream(), torch.cuda.get_rng_state()]
    return state


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def _check_no_side_effects(ckpt, device):
    reference = _engine_calls(ckpt, device)()  # under the usual settings
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), \
        torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        calls = _engine_calls(ckpt, device)
        torch.manual_seed(1234)
        before = _process_state(device)
        got = calls()
        assert _same(_process_state(device), before)
        assert got == reference  # the caller's settings do not change the engine's results
    finally:
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)


def test_engine_calls_leave_the_process_state_alone(ckpt):
    _check_no_side_effects(ckpt, "cpu")


@pytest.mark.gpu
def test_engine_calls_leave_the_process_state_alone_on_cuda(ckpt):
    side = torch.cuda.Stream()
    torch.cuda.manual_seed(99)
    with torch.cuda.stream(side):  # the caller's own stream must stay current
        _check_no_side_effects(ckpt, "cuda")


# -- the KV memory budget ------------------------------------------------------------------------

def _fork_bytes(slots, positions):
    """A fork-layout cache by hand: L x (K, V) x slots x n_kv x positions x head_dim fp32, plus
    the int32 lengths."""
    return L * 2 * slots * N_KV * positions * HD * BYTES + 4 * slots


def test_budget_sizes_the_batch_fork_layout(ckpt):
    policy = load_policy(ckpt, dtype=torch.float32)
    prm = ValueModel(load_decoder(tiny_checkpoint("qwen2", seed=1), dtype=torch.float32),
                     _value_head(policy.model, "cpu"), "value", _tok(ckpt))
    k, seq = 3, 48
    # One search request: K policy slots of seq + 1 positions (a scratch position) + K PRM slots.
    one = _fork_bytes(k, seq + 1) + _fork_bytes(k, seq)
    engine = Engine(policy, prm=prm, max_batch=8, max_seq_len=seq, kv_cache_bytes=2 * one + 1)
    cfg = SearchConfig(candidates=k, max_new_tokens=4, max_step_tokens=2, check_every=2, seed=1)
    prompts = PROMPTS + PROMPTS[:1]  # three requests, two at a time
    got = engine.search(prompts, config=cfg)
    assert engine.cache.num_slots == 2 * k and engine.prm.cache.num_slots == 2 * k
    # The budget changes only how many requests run at once (each slot has its own random stream,
    # so the reference is an engine without a budget running as many).
    ref = Engine(policy, prm=prm, max_batch=2, max_seq_len=seq)
    assert [r.token_ids for r in got] == [r.token_ids for r in ref.search(prompts, config=cfg)]
    # generate next: the budget holds (2 * one + 1) // _fork_bytes(1, seq + 1) single-slot
    # requests, at most max_batch; the PRM's cache is freed, so the two never add up past it.
    gens = engine.generate(PROMPTS * 3, max_new_tokens=4, seed=4)
    wave = min(8, (2 * one + 1) // _fork_bytes(1, seq + 1))
    assert engine.cache.num_slots == wave and engine.prm.cache is None
    ref = Engine(policy, max_batch=wave, max_seq_len=seq)
    assert [g.token_ids for g in gens] == \
        [g.token_ids for g in ref.generate(PROMPTS * 3, max_new_tokens=4, seed=4)]
    with pytest.raises(ValueError, match=rf"kv_cache_bytes=1,000 cannot hold one request, which "
                                         rf"needs {_fork_bytes(1, seq + 1):,} bytes"):
        Engine(policy, max_seq_len=seq, kv_cache_bytes=1000)
    small = Engine(policy, prm=prm, max_seq_len=seq, kv_cache_bytes=one - 1)
    with pytest.raises(ValueError, match=rf"needs {one:,} bytes: {_fork_bytes(k, seq + 1):,} of "
                                         r"policy KV cache \(fork layout, beams=1 x "
                                         r"candidates=3 = 3 slots"):
        small.search(PROMPTS, config=cfg)


def test_budget_sizes_the_batch_shared_prefix_layout(ckpt):
    policy = load_policy(ckpt, dtype=torch.float32)
    k, seq, step = 3, 48, 2
    # One request: a prefix slot of seq + 1 positions and K candidate slots of step + 1.
    one = _fork_bytes(1, seq + 1) + _fork_bytes(k, step + 1)
    scorer = lambda ps, rs: [float(len(r) % 5) for r in rs]  # noqa: E731
    cfg = SearchConfig(candidates=k, max_new_tokens=4, max_step_tokens=step, seed=2, check_every=2,
                       scorer=scorer)
    engine = Engine(policy, max_batch=None, max_seq_len=seq, cache_layout="shared_prefix",
                    kv_cache_bytes=3 * one)
    got = engine.search(PROMPTS * 2, config=cfg)
    assert engine.cache.num_groups == 3 and engine.cache.num_slots == 3 * k
    held = sum(t.numel() * t.element_size() for t in (engine.cache.prefix.data,
               engine.cache.prefix.lens, engine.cache.suffix.data, engine.cache.suffix.lens))
    assert held == 3 * one
    ref = Engine(policy, max_batch=3, max_seq_len=seq, cache_layout="shared_prefix")
    assert [r.token_ids for r in got] == [r.token_ids for r in ref.search(PROMPTS * 2, config=cfg)]
    with pytest.raises(ValueError, match=rf"needs {one:,} bytes: {one:,} of policy KV cache "
                                         r"\(shared_prefix layout, beams=1 x "
                                         r"candidates=3 = 3 slots"):
        Engine(policy, max_seq_len=seq, cache_layout="shared_prefix",
               kv_cache_bytes=one - 1).search(PROMPTS, config=cfg)


def test_budget_arguments_are_checked(ckpt):
    from mahalo_engine.cache import available_bytes

    policy = load_policy(ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match="not both"):
        Engine(policy, kv_cache_bytes=10**6, kv_cache_fraction=0.5)
    with pytest.raises(ValueError, match=r"kv_cache_fraction must be a number in \(0, 1\], got 0"):
        Engine(policy, kv_cache_fraction=0)
    with pytest.raises(ValueError, match="kv_cache_bytes must be an int >= 1, got 1.5"):
        Engine(policy, kv_cache_bytes=1.5)
    with pytest.raises(ValueError, match="max_batch=None .* needs a KV budget"):
        Engine(policy, max_batch=None)
    free = available_bytes(torch.device("cpu"))
    engine = Engine(policy, max_seq_len=48, kv_cache_fraction=0.01)
    assert 0 < engine.kv_cache_bytes <= free


# -- the README's example --------------------------------------------------------------------------

def test_readme_training_loop_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("**The engine inside a training loop**"):]
    block = block[block.index("```python") + len("```python"):]
    block = block[:block.index("```")]
    assert "Engine.from_models" in block and "update_weights" in block
    exec(compile(block, "README.md", "exec"), {})
