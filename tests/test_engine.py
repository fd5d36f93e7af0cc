"""Engine.generate / Engine.search on tiny local checkpoints (fp32, CPU), each against an
independent reference: transformers' greedy generate, full re-encodes (`prm.score_full`,
`policy.logits`, a fresh prefill), single-request runs."""
import json
import math
from pathlib import Path

import pytest
import torch

from mahalo_engine.cache import KVCache
from mahalo_engine.engine import (Engine, SearchConfig, SharedBackbonePRM, WeightedScorer,
                                  boxed_closed)
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.value_model import ValueHead, ValueModel, load_prm, save_prm
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder
from test_engine_graphs import assert_same_generations

PROMPTS = ["Question: How many clips", "The quick brown fox jumps over", "Step 1:"]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _prm(tmp, name, backbone_dir, *, kind="value", seed=0):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = load_decoder(backbone_dir, dtype=torch.float32)
    save_prm(tmp / name, model, ValueHead(model.config.hidden_size), kind,
             AutoTokenizer.from_pretrained(backbone_dir))
    return load_prm(tmp / name, dtype=torch.float32)


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def policy(ckpt):
    return load_policy(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def prms(tmp_path_factory, ckpt):
    tmp = tmp_path_factory.mktemp("prms")
    return {
        # Another backbone, same tokenizer: candidate ids are fed as they are.
        "other": _prm(tmp, "other", tiny_checkpoint("qwen2", seed=1)),
        # The policy's own backbone: usable as a shared-backbone scorer.
        "own": _prm(tmp, "own", ckpt, kind="binary", seed=1),
        # Another tokenizer (vocabulary 400): step texts are re-tokenised.
        "bridge": _prm(tmp, "bridge", tiny_checkpoint("llama", seed=2, vocab_size=400), seed=2),
    }


@pytest.fixture(scope="module")
def engine(policy, prms):
    return Engine(policy, prm=prms["other"], max_batch=3, max_seq_len=96)


def _ids(policy, prompt):
    return policy.tokenizer.encode(prompt)


def _committed(prompt_ids, steps, upto):
    out = list(prompt_ids)
    for s in steps[:upto]:
        out += s.token_ids
    return out


# -- generation ---------------------------------------------------------------------------------


def test_greedy_generate_matches_transformers(engine, policy, ckpt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    gens = engine.generate(PROMPTS, temperature=0, max_new_tokens=12)  # ragged, one batch
    for prompt, gen in zip(PROMPTS, gens):
        ids = torch.tensor([_ids(policy, prompt)])
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert gen.token_ids == ref
        assert gen.finish_reason == ("eos" if ref[-1] in engine.eos_ids else "length")
        # log-probs under T=0 are those of softmax(z): check them against a full forward
        logits = policy.logits(torch.tensor([_ids(policy, prompt) + ref]))[0]
        logp = torch.log_softmax(logits[ids.shape[1] - 1:-1], dim=-1)
        assert torch.allclose(torch.tensor(gen.logprobs), logp[torch.arange(len(ref)), ref],
                              atol=1e-4)


def test_generate_and_search_pass_top_p_and_min_p(engine, policy):
    """A tiny top_p (or min_p = 1) keeps the top token only: sampling then gives the greedy
    tokens, through generate and through a search config; a real nucleus differs from greedy
    somewhere, and a repeated call (same seed) gives the same tokens."""
    greedy = [g.token_ids for g in engine.generate(PROMPTS, temperature=0, max_new_tokens=8)]
    for kw in (dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=300, top_p=1e-6)):
        sampled = engine.generate(PROMPTS, temperature=1.3, seed=5, max_new_tokens=8, **kw)
        assert [g.token_ids for g in sampled] == greedy, kw  # (log-probs: at T = 1.3)
    cfg = dict(candidates=1, boundary=" ", max_steps=2, max_step_tokens=4, top_k=0)
    assert ([r.token_ids for r in engine.search(PROMPTS, config=SearchConfig(temperature=0, **cfg))]
            == [r.token_ids for r in engine.search(PROMPTS, config=SearchConfig(
                temperature=1.3, seed=5, min_p=1.0, **cfg))])
    nucleus = engine.generate(PROMPTS, temperature=1.5, seed=2, max_new_tokens=8, top_p=0.9,
                              min_p=0.01)
    assert nucleus == engine.generate(PROMPTS, temperature=1.5, seed=2, max_new_tokens=8,
                                      top_p=0.9, min_p=0.01)
    assert [g.token_ids for g in nucleus] != greedy


def test_generate_stop_strings(engine):
    full = engine.generate(PROMPTS, temperature=0, max_new_tokens=16)
    tok = engine.tokenizer
    for gen in full:
        stop = tok.decode(gen.token_ids[4:6])  # a string that occurs in the greedy output
        (cut,) = engine.generate([PROMPTS[full.index(gen)]], temperature=0, max_new_tokens=16,
                                 stop=[stop])
        # The shortest prefix of the unstopped output whose text contains the stop string.
        n = next(i for i in range(1, 17) if stop in tok.decode(gen.token_ids[:i]))
        assert cut.token_ids == gen.token_ids[:n] and cut.finish_reason == "stop"


def test_head_weights_per_request_match_alone(policy):
    model = policy.model
    noise = torch.randn(policy.heads.shape[1:], generator=torch.Generator().manual_seed(0))
    two = Policy(model, policy.tokenizer, torch.cat([policy.heads, policy.heads + 0.05 * noise]),
                 ["acc", "eng"])
    eng = Engine(two, max_batch=2, max_seq_len=64)
    weights = [[1.0, 0.0], [0.3, 0.7]]
    batch = eng.generate(PROMPTS[:2], head_weights=weights, temperature=0, max_new_tokens=8)
    for prompt, w, gen in zip(PROMPTS[:2], weights, batch):
        alone = eng.generate([prompt], head_weights=w, temperature=0, max_new_tokens=8)[0]
        assert gen.token_ids == alone.token_ids
        # Independent reference: greedy over full forwards with the mixed heads.
        ids = _ids(policy, prompt)
        for _ in range(8):
            ids.append(int(two.logits(torch.tensor([ids]), head_weights=w)[0, -1].argmax()))
        assert gen.token_ids == ids[-8:]
    # search, one candidate: the same per request in a batch as alone
    cfg = SearchConfig(candidates=1, temperature=0, boundary=" ", max_new_tokens=8, check_every=2)
    both = eng.search(PROMPTS[:2], head_weights=weights, config=cfg)
    for prompt, w, res in zip(PROMPTS[:2], weights, both):
        assert res.token_ids == eng.search([prompt], head_weights=w, config=cfg)[0].token_ids


# -- search -------------------------------------------------------------------------------------


def test_search_one_candidate_greedy_equals_generate(engine):
    cfg = SearchConfig(candidates=1, temperature=0, boundary=" ", max_new_tokens=14,
                       max_steps=50, check_every=3)
    gens = engine.generate(PROMPTS, temperature=0, max_new_tokens=14)
    for gen, res in zip(gens, engine.search(PROMPTS, config=cfg)):
        assert res.token_ids == gen.token_ids
        assert [t for s in res.steps for t in s.token_ids] == res.token_ids
        for s in res.steps[:-1]:  # every step but the last ends at its boundary
            assert s.finish_reason == "boundary" and " " in engine.tokenizer.decode(s.token_ids)


def test_step_scores_equal_full_rescoring(engine, policy, prms):
    prm = prms["other"]
    cfg = SearchConfig(candidates=3, boundary=" ", max_steps=3, max_step_tokens=8, seed=3,
                       check_every=2)
    for prompt, res in zip(PROMPTS, engine.search(PROMPTS, config=cfg)):
        assert len(res.steps) == 3 and res.finish_reason == "max_steps"
        for i, step in enumerate(res.steps):
            ref = prm.score_full([_committed(_ids(policy, prompt), res.steps, i + 1)]).item()
            assert abs(step.score - ref) < 1e-4
            assert step.score == max(step.candidate_scores)
            assert step.candidate_scores.index(step.score) == \
                max(range(3), key=lambda j: (step.candidate_scores[j], -j))
        # Each candidate slot draws from its own random stream: the candidates differ.
        assert any(len(set(step.candidate_scores)) == 3 for step in res.steps)


def test_reencoding_prm_with_another_tokenizer(engine, prms):
    prm = prms["bridge"]
    cfg = SearchConfig(candidates=2, boundary=" ", max_steps=3, max_step_tokens=8, scorer=prm,
                       check_every=2)
    for prompt, res in zip(PROMPTS[:2], engine.search(PROMPTS[:2], config=cfg)):
        ids = prm.tokenizer.encode(prompt)  # prompt, then each step's text tokenised on its own
        for step in res.steps:
            ids += prm.tokenizer.encode(step.text, add_special_tokens=False)
            assert abs(step.score - prm.score_full([ids]).item()) < 1e-4


def test_policy_cache_after_promote_equals_fresh_prefill(policy, prms):
    eng = Engine(policy, prm=prms["other"], max_batch=1, max_seq_len=96)
    k = 3
    (res,) = eng.search([PROMPTS[0]], config=SearchConfig(candidates=k, boundary=" ", max_steps=3,
                                                          max_step_tokens=8, check_every=2))
    assert len(res.steps) == 3
    # The last step was not promoted (the request ended); the one before was: every slot of the
    # group holds prompt + steps 1-2 and then its own last candidate.
    committed = _committed(_ids(policy, PROMPTS[0]), res.steps, 2)
    n = len(committed)
    fresh = KVCache.allocate(policy.config, 1, 96, dtype=torch.float32, device="cpu")
    policy.model.prefill(fresh, [committed], torch.tensor([0]))
    nxt = res.steps[2].token_ids[0]
    ref = policy.logits(torch.tensor([committed + [nxt]]))[0, -1]
    full = torch.log_softmax(policy.logits(torch.tensor([committed]))[0, -1], dim=-1)
    for slot in range(k):
        assert torch.allclose(eng.cache.data[:, :, slot, :, :n], fresh.data[:, :, 0, :, :n],
                              atol=1e-5)
        # The promote also handed every slot the winner's hidden state: each slot's first token of
        # step 3 was drawn (T=1) from the committed text's next-token distribution.
        first = int(eng._runner.tokens[slot, 0])
        assert abs(float(eng._runner.logprobs[slot, 0]) - float(full[first])) < 1e-4
        eng.cache.lens[slot] = n
        hidden = policy.model.decode(eng.cache, torch.tensor([nxt]), torch.tensor([slot]))
        assert torch.allclose(hidden @ policy.heads[0].T, ref, atol=1e-4)


def test_every_candidate_slot_stays_exact_across_promotes_and_reused_groups(policy, prms):
    """Greedy candidates of a request are identical, so each must equal greedy generation whatever
    slot wins: a judge forces the last candidate (promote from a non-first slot), the PRM must give
    every candidate the same score, and 3 requests share 2 groups (a request ends while the other
    goes on; the third reuses the freed group's stale slots; the last one left moves down into
    the free first group)."""
    prm = prms["other"]
    eng = Engine(policy, prm=prm, max_batch=2, max_seq_len=64)
    k = 3
    last = SearchConfig(candidates=k, temperature=0, boundary=" ", max_new_tokens=10,
                        max_steps=50, check_every=2,
                        scorer=[(prm, 1.0), (lambda p, r: [10.0 * (i % k) for i in range(len(r))],
                                             1.0)])
    gens = eng.generate(PROMPTS, temperature=0, max_new_tokens=10)
    for prompt, gen, res in zip(PROMPTS, gens, eng.search(PROMPTS, config=last)):
        assert res.token_ids == gen.token_ids
        for i, step in enumerate(res.steps):
            prm_scores = [c - 10.0 * j for j, c in enumerate(step.candidate_scores)]
            ref = prm.score_full([_committed(_ids(policy, prompt), res.steps, i + 1)]).item()
            assert prm_scores == pytest.approx([ref] * k, abs=1e-4)
            assert step.score == pytest.approx(ref + 10.0 * (k - 1), abs=1e-4)


def test_same_seed_same_result(policy, prms):
    engine = Engine(policy, prm=prms["other"], max_batch=2, max_seq_len=64)
    cfg = dict(candidates=3, boundary=" ", max_steps=2, max_step_tokens=6, check_every=2, top_k=0)
    # The first call allocates the engine's state under inference mode; later calls outside it
    # must still be able to update that state in place.
    with torch.inference_mode():
        a = engine.search(PROMPTS[:2], config=SearchConfig(seed=7, **cfg))
    b = engine.search(PROMPTS[:2], config=SearchConfig(seed=7, **cfg))
    c = engine.search(PROMPTS[:2], config=SearchConfig(seed=8, **cfg))
    assert a == b
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    g1 = engine.generate(PROMPTS, temperature=1.0, top_k=20, seed=4, max_new_tokens=6)
    assert g1 == engine.generate(PROMPTS, temperature=1.0, top_k=20, seed=4, max_new_tokens=6)


def test_shared_backbone_weighted_and_callable_scorers(engine, policy, prms):
    own, other = prms["own"], prms["other"]
    shared = SharedBackbonePRM.from_prm(own, policy)
    base = dict(candidates=3, boundary=" ", max_steps=2, max_step_tokens=6, check_every=2, top_k=0)
    for res, prompt in zip(engine.search(PROMPTS[:2], config=SearchConfig(scorer=shared, **base)),
                           PROMPTS):
        for i, step in enumerate(res.steps):
            ids = _committed(_ids(policy, prompt), res.steps, i + 1)
            assert abs(step.score - own.score_full([ids]).item()) < 1e-4
    with pytest.raises(ValueError, match="not the policy's"):
        SharedBackbonePRM.from_prm(other, policy)
    assert SharedBackbonePRM.load(own.path, policy).kind == "binary"

    weighted = SearchConfig(scorer=[(other, 0.7), (shared, 0.3)], **base)
    for res, prompt in zip(engine.search(PROMPTS[:2], config=weighted), PROMPTS):
        for i, step in enumerate(res.steps):
            ids = [_committed(_ids(policy, prompt), res.steps, i + 1)]
            ref = 0.7 * other.score_full(ids).item() + 0.3 * own.score_full(ids).item()
            assert abs(step.score - ref) < 1e-4

    # The same PRM listed twice is one part (its cache is extended and promoted once per step);
    # a zero-weight part is dropped.
    twice = WeightedScorer([(engine.prm, 0.4), (engine.prm, 0.6), (shared, 0.0)])
    assert twice.parts == [(engine.prm, 1.0)]
    for res, prompt in zip(engine.search(PROMPTS[:1], config=SearchConfig(
            scorer=[(other, 0.4), (other, 0.6), (own, 0.0)], **base)), PROMPTS):
        for i, step in enumerate(res.steps):
            ids = [_committed(_ids(policy, prompt), res.steps, i + 1)]
            assert abs(step.score - other.score_full(ids).item()) < 1e-4

    seen = []

    def longest(prompts, responses):  # a "judge" on texts
        seen.append((prompts, responses))
        return [len(r) for r in responses]

    for res in engine.search(PROMPTS[:2], config=SearchConfig(scorer=longest, **base)):
        for step in res.steps:
            assert step.score == max(step.candidate_scores)
    prompts, responses = seen[0]
    assert prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 and len(responses) == 6


def test_selection_by_softmax_temperature(engine):
    base = dict(candidates=3, boundary=" ", max_steps=2, max_step_tokens=6, seed=1, check_every=2,
                top_k=0)
    argmax = engine.search(PROMPTS[:1], config=SearchConfig(**base))
    sharp = engine.search(PROMPTS[:1], config=SearchConfig(selection_temperature=1e-6, **base))
    assert argmax == sharp
    # Ties go to the lowest index: with equal scores the first candidate's step is committed.
    seen = []

    def flat(prompts, responses):
        seen.append(responses)
        return [1.0] * len(responses)

    (res,) = engine.search(PROMPTS[:1], config=SearchConfig(scorer=flat, **base))
    assert len(set(seen[0])) > 1  # the candidates differ, so the pick is observable
    done = ""
    for step, responses in zip(res.steps, seen):
        assert responses[0] == done + step.text
        done += step.text


def test_stop_conditions_and_max_new_tokens(engine):
    cfg = SearchConfig(candidates=2, boundary=" ", max_steps=20, max_step_tokens=4, check_every=2,
                       max_new_tokens=7, top_k=0)
    for res in engine.search(PROMPTS[:2], config=cfg):
        assert res.finish_reason in ("max_new_tokens", "eos") and len(res.token_ids) <= 7
    base = dict(candidates=2, boundary=" ", check_every=2, top_k=0)
    first = engine.search(PROMPTS[:1], config=SearchConfig(max_steps=1, **base))[0]
    stop = first.steps[0].text[:2]
    res = engine.search(PROMPTS[:1], config=SearchConfig(max_steps=5, stop=[stop], **base))[0]
    assert res.finish_reason == "stop" and len(res.steps) == 1
    assert boxed_closed("so \\boxed{\\frac{1}{2}} done") and not boxed_closed("\\boxed{\\frac{1}")


def test_max_seq_len_ends_the_request_not_the_batch(policy, prms):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 2
    n_long = len(_ids(policy, long_prompt))
    eng = Engine(policy, prm=prms["other"], max_batch=2, max_seq_len=n_long + 5)
    # max_step_tokens * max_steps = 9 > 5 free positions for the long prompt, < those of the short
    cfg = SearchConfig(candidates=2, boundary=" ", max_steps=3, max_step_tokens=3, check_every=2)
    short, long = eng.search(["Step 1:", long_prompt], config=cfg)
    assert long.finish_reason == "max_seq_len" and len(long.token_ids) == 5
    assert short.finish_reason in ("max_steps", "eos") and len(short.token_ids) <= 9
    (gen,) = eng.generate([long_prompt], temperature=0, max_new_tokens=50)
    assert gen.finish_reason == "max_seq_len" and len(gen.token_ids) == 5


def test_confirmation_resumes_a_slot_in_the_state_of_its_text(engine, policy):
    """A slot the tables stopped inside a character split over byte tokens is rejected by the
    host, and resumes in the boundary automaton's state after its decoded text, not the tables'
    restart state (so the "\\n" of "。\\n" can complete the boundary next)."""
    from mahalo_engine.boundary import Boundary
    from mahalo_engine.engine.decode_runner import PENDING, RUNNING

    boundary = engine._compile(Boundary(strings=("\u3002\n",)))
    runner = engine._prepare(1, None)
    runner.set_boundary(boundary)
    step = policy.tokenizer.encode("We add 3\u3002", add_special_tokens=False)
    slot = torch.tensor([0])
    runner.begin(slot, torch.tensor([50]))
    engine.cache.lens[0] = len(step)
    runner.tokens[0, : len(step)] = torch.tensor(step)
    runner.step_len[0] = len(step)
    runner.reason[0], runner.active[0] = PENDING, False
    assert runner._confirm(slot, engine._confirmer(boundary))
    assert int(runner.reason[0]) == RUNNING and bool(runner.active[0])
    assert int(runner.bstate[0, 0]) == boundary.states_after("We add 3\u3002")[0] != 0


# -- errors -------------------------------------------------------------------------------------


def test_errors(engine, policy, prms):
    with pytest.raises(ValueError, match="candidates must be an int >= 1, got 0"):
        SearchConfig(candidates=0)
    with pytest.raises(ValueError, match="unknown boundary 'sentense'"):
        engine.search(PROMPTS[:1], config=SearchConfig(boundary="sentense"))
    with pytest.raises(ValueError, match="needs a scorer"):
        Engine(policy).search(PROMPTS[:1], config=SearchConfig(candidates=2))
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens but max_seq_len is 6"):
        Engine(policy, max_seq_len=6).generate(["ab", PROMPTS[1]])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0 .*got -1"):
        SearchConfig(top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be a finite number in \(0, 1\], got 1.5"):
        SearchConfig(top_p=1.5)
    with pytest.raises(ValueError, match=r"min_p must be a finite number in \[0, 1\], got nan"):
        engine.generate(PROMPTS, min_p=float("nan"))
    with pytest.raises(TypeError, match="prompts must be"):
        engine.generate("a bare string")
    # The caches do not fit: an error with the bytes, raised before anything is allocated.
    huge = Engine(policy, prm=prms["other"], max_batch=4096, max_seq_len=1 << 20)
    with pytest.raises(ValueError, match=r"need [\d,]+ bytes of policy KV cache \+ [\d,]+ bytes of "
                                         r"PRM cache .* only [\d,]+ bytes are available"):
        huge.search(PROMPTS[:1], config=SearchConfig(candidates=5))
    assert huge.cache is None and prms["other"].path  # nothing allocated
    # A PRM without a tokenizer must share the policy's vocabulary.
    bridge = prms["bridge"]
    bare = ValueModel(bridge.model, bridge.value_head, "value", tokenizer=None)
    with pytest.raises(ValueError, match="vocabulary size 400 and no tokenizer"):
        engine.search(PROMPTS[:1], config=SearchConfig(candidates=2, scorer=bare))
    # A prompt that fits the policy but not the PRM's own tokenizer fails before any step runs.
    assert len(_ids(policy, PROMPTS[1])) < 16 <= len(bridge.tokenizer.encode(PROMPTS[1]))
    with pytest.raises(ValueError, match=r"prompts \(index, PRM tokens\) \[\(1, \d+\)\] do not "):
        Engine(policy, max_batch=1, max_seq_len=16).search(
            ["Step 1:", PROMPTS[1]], config=SearchConfig(candidates=2, scorer=bridge))
    with pytest.raises(ValueError, match="3 scores for 6 candidates|returned 3 scores"):
        engine.search(PROMPTS[:2], config=SearchConfig(candidates=3, boundary=" ",
                                                      max_step_tokens=2,
                                                      scorer=lambda p, r: [0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        engine.search(PROMPTS[:1], config=SearchConfig(candidates=2, boundary=" ",
                                                      max_step_tokens=2,
                                                      scorer=lambda p, r: [math.nan] * len(r)))


# -- chat ---------------------------------------------------------------------------------------


def _chatml(messages):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


@pytest.mark.skipif(not (DATA / "tutoring_prefixes.jsonl").is_file(),
                    reason=f"real data not found at {DATA} (absent outside the project's "
                           "workspace)")
def test_chat_turn_boundary_on_tutoring_prefixes(policy, prms):
    dialogues = [json.loads(line)["messages"] for line in
                 (DATA / "tutoring_prefixes.jsonl").read_text().splitlines() if line.strip()]
    tok = policy.tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    # Dialogues under 2048 tokens (all but the longest), to keep the CPU run short.
    ids = [tok.encode(_chatml(m), add_special_tokens=False) for m in dialogues]
    dialogues = [m for m, x in zip(dialogues, ids) if len(x) < 2048]
    ids = [x for x in ids if len(x) < 2048]
    assert len(dialogues) >= 3
    # Make the random policy end its turn now and then: point the end-of-turn row of the head at
    # the mean hidden direction of these dialogues.
    with torch.no_grad():
        mean = torch.cat([policy.model(torch.tensor([x]))[0] for x in ids]).mean(0)
    heads = policy.heads.clone()
    heads[0, eot] = 5.0 * mean / mean.norm() ** 2
    talker = Policy(policy.model, tok, heads, policy.objectives)
    prm = prms["other"]
    eng = Engine(talker, prm=prm, max_batch=4, max_seq_len=max(map(len, ids)) + 64)
    cfg = SearchConfig(candidates=2, boundary="turn", max_step_tokens=24, max_steps=2, seed=0,
                       check_every=4)
    # chat=True renders a string prompt as a user turn with the template's generation prompt.
    (as_chat,) = eng.generate(["Hi!"], chat=True, temperature=0, max_new_tokens=4)
    chat_ids = tok.encode(_chatml([{"role": "user", "content": "Hi!"}]), add_special_tokens=False)
    assert as_chat == eng.generate([chat_ids], temperature=0, max_new_tokens=4)[0]
    results = eng.search(dialogues, config=cfg, chat=True)
    ended = 0
    for prompt_ids, res in zip(ids, results):
        for i, step in enumerate(res.steps):
            if step.finish_reason == "eos":  # <|im_end|>: the turn is over, so is the request
                assert step.token_ids[-1] == eot and eot not in step.token_ids[:-1]
                assert res.finish_reason == "eos" and i == len(res.steps) - 1
                ended += 1
            else:
                assert step.finish_reason == "length" and len(step.token_ids) == 24
            ref = prm.score_full([_committed(prompt_ids, res.steps, i + 1)]).item()
            assert abs(step.score - ref) < 1e-4  # the PRM saw the rendered chat prompt
    assert ended >= 2


# -- CUDA graphs --------------------------------------------------------------------------------


def test_graph_operands_merge_shared_weights(policy):
    """What a captured graph samples with: merged heads while rows share fewer weight vectors than
    there are heads (keyed by every row's weights and the heads), else the live weights buffer
    (keyed by the heads' storage only)."""
    from mahalo_engine.engine.sampler import Sampler

    noise = torch.randn(policy.heads.shape[1:], generator=torch.Generator().manual_seed(1))
    heads = torch.cat([policy.heads, policy.heads + 0.05 * noise])
    sampler = Sampler(heads, 4)
    sampler.configure(0.0, 0, 0)
    hidden = torch.randn(4, heads.shape[2], generator=torch.Generator().manual_seed(2))
    shared = torch.tensor([[0.3, 0.7]] * 4)
    sampler.set_weights(shared)
    h, w, key = sampler.graph_operands(4)
    assert h.shape[0] == 1 and tuple(tuple(r) for r in shared[:1].tolist()) in key
    assert heads.data_ptr() in key  # a merged graph must miss once the heads change
    assert torch.equal(sampler.sample(hidden, h, w)[0], sampler.sample(hidden)[0])
    ref = (0.3 * hidden @ heads[0].T + 0.7 * hidden @ heads[1].T).argmax(dim=1)
    assert torch.equal(sampler.sample(hidden, h, w)[0], ref)
    sampler.set_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2))
    h, w, key = sampler.graph_operands(4)
    # The general path: the live heads and weights buffer, read in place by a graph.
    assert h is heads and w.data_ptr() == sampler.weights.data_ptr() and w.shape == (4, 2)
    assert heads.data_ptr() in key and not any(isinstance(k, tuple) for k in key)  # no rows



def test_sampler_reads_its_temperature_buffer_at_each_draw(policy):
    """The per-slot temperatures are a device buffer the kernels read (as a captured step does on
    replay): writing it in place changes what the next draw samples, slot by slot."""
    from mahalo_engine.engine.sampler import Sampler
    from triton_kernels import multihead_sample

    sampler = Sampler(policy.heads, 6)
    sampler.configure(0.5, 0, 3)
    weights = policy.weight_matrix(None, 6)
    sampler.set_weights(weights)
    hidden = 3 * torch.randn(6, policy.heads.shape[2], generator=torch.Generator().manual_seed(4))
    draw = lambda t: multihead_sample(hidden, policy.heads, weights, temperature=t, seed=3,
                                      offset=0)
    first, _ = sampler.sample(hidden)
    assert torch.equal(first, draw(0.5)[0])
    sampler.offset.zero_()  # the same random numbers as the first draw
    sampler.temperature[0::2] = 0.0
    sampler.temperature[1::2] = 4.0
    tokens, logprobs = sampler.sample(hidden)
    for rows, t in ((slice(0, None, 2), 0.0), (slice(1, None, 2), 4.0)):
        expected = draw(t)
        assert torch.equal(tokens[rows], expected[0][rows])
        torch.testing.assert_close(logprobs[rows], expected[1][rows], atol=1e-5, rtol=0)
    assert not torch.equal(tokens, first)


def test_sampler_advances_its_offset_at_each_draw(policy):
    """Each draw uses the next random stream: offset 1 after one draw, and a second draw without
    a reset is exactly a direct call at offset 1 (not a replay of offset 0's numbers)."""
    from mahalo_engine.engine.sampler import Sampler
    from triton_kernels import multihead_sample

    sampler = Sampler(policy.heads, 16)
    sampler.configure(1.0, 0, 5)
    weights = policy.weight_matrix(None, 16)
    sampler.set_weights(weights)
    # Flat logits: a redraw with other numbers changes many of the 16 rows.
    hidden = 0.3 * torch.randn(16, policy.heads.shape[2], generator=torch.Generator().manual_seed(6))
    direct = lambda offset: multihead_sample(hidden, policy.heads, weights, temperature=1.0, seed=5,
                                             offset=offset)[0]
    assert not torch.equal(direct(0), direct(1))  # precondition: the two streams differ here
    assert torch.equal(sampler.sample(hidden)[0], direct(0))
    assert sampler.offset.tolist() == [1]
    assert torch.equal(sampler.sample(hidden)[0], direct(1))
    assert sampler.offset.tolist() == [2]
    sampler.configure(1.0, 0, 5)  # a new call restarts the streams
    assert sampler.offset.tolist() == [0]


def _constant_distribution_policy(ckpt, p_top: dict[int, float]) -> tuple[Policy, torch.Tensor]:
    """A policy whose next-token distribution is the same at every position of every sequence,
    and that distribution ``p`` in float64.

    Zero attention and MLP output projections leave the residual stream at the token's
    embedding, and one embedding row for every token makes it the same vector ``e``: the final
    hidden state is ``h = rmsnorm(e)`` everywhere. One head ``W_v = z_v h / |h|²`` gives logits
    ``z`` (log ``p_top`` on its tokens, -40 elsewhere)."""
    policy = load_policy(ckpt, dtype=torch.float32)
    backbone = policy.model.model
    with torch.no_grad():
        for layer in backbone.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = torch.randn(policy.config.hidden_size, generator=torch.Generator().manual_seed(3))
        backbone.embed_tokens.weight.copy_(e.expand_as(backbone.embed_tokens.weight))
    e64 = e.double()
    h = e64 * torch.rsqrt(e64.pow(2).mean() + policy.config.rms_norm_eps) \
        * backbone.norm.weight.detach().double()
    z = torch.full((policy.config.vocab_size,), -40.0, dtype=torch.float64)
    for token, prob in p_top.items():
        z[token] = math.log(prob)
    heads = (z[:, None] * h[None, :] / h.dot(h)).float()[None]
    p = torch.softmax(heads[0].double() @ h, dim=0)
    return Policy(policy.model, policy.tokenizer, heads, ["constant"]), p


def test_generation_draws_fresh_noise_at_every_step(ckpt):
    """Under a policy with the same next-token distribution p at every step, a slot's consecutive
    tokens are independent draws from p: equal with probability q = Σ p_i². Were every step to
    reuse the first step's random numbers, each slot would repeat one token (fraction 1).

    Bound: F = mean over the n(L-1) consecutive pairs of 1[x_t = x_t+1] is a function of nL
    independent draws, each in at most 2 pairs, so McDiarmid gives
    P(|F - q| >= eps) <= 2 exp(-eps² n (L-1)² / (2L))."""
    policy, p = _constant_distribution_policy(ckpt, {100: 0.4, 101: 0.3, 102: 0.2, 103: 0.1})
    assert p[policy.tokenizer.eos_token_id] < 1e-12  # no slot stops early
    from mahalo_engine.engine.engine import GENERATE_CHECK_EVERY

    n, steps, delta = 64, GENERATE_CHECK_EVERY, 1e-6  # steps: one chunk between host checks
    engine = Engine(policy, max_batch=n, max_seq_len=64)
    gens = engine.generate([PROMPTS[i % 3] for i in range(n)], temperature=1.0, seed=9,
                           max_new_tokens=steps)
    tokens = torch.tensor([g.token_ids for g in gens])
    assert tokens.shape == (n, steps) and set(tokens.flatten().tolist()) <= {100, 101, 102, 103}
    equal = (tokens[:, 1:] == tokens[:, :-1]).double().mean().item()
    q = p.pow(2).sum().item()
    eps = math.sqrt(2 * steps * math.log(2 / delta) / (n * (steps - 1) ** 2))
    assert abs(equal - q) <= eps, (equal, q, eps)


@pytest.mark.gpu
def test_cuda_graphs_match_eager(ckpt, tmp_path):
    policy = load_policy(ckpt, dtype=torch.float32, device="cuda")
    prm = _prm(tmp_path, "prm", tiny_checkpoint("qwen2", seed=1))
    prm = load_prm(prm.path, dtype=torch.float32, device="cuda")
    graphs = Engine(policy, prm=prm, max_batch=3, max_seq_len=96, cuda_graphs=True)
    eager = Engine(policy, prm=prm, max_batch=3, max_seq_len=96, cuda_graphs=False)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3)):
        # Tokens exact, log-probs within a stated tolerance (test_engine_graphs explains why).
        assert_same_generations(graphs.generate(PROMPTS, max_new_tokens=12, **kw),
                                eager.generate(PROMPTS, max_new_tokens=12, **kw))
        # Long enough that the attended prefix outgrows its first bucket (64) mid-run: a capture
        # for the next kv_len bucket between replays.
        assert_same_generations(graphs.generate(PROMPTS, max_new_tokens=80, **kw),
                                eager.generate(PROMPTS, max_new_tokens=80, **kw))
    assert {key[1] for key in graphs._runner._graphs} >= {64, 97}  # kv_len buckets captured
    # The temperature is a device buffer, not part of a graph's key: a new one replays the graphs.
    captured = set(graphs._runner._graphs)
    kw = dict(max_new_tokens=12, temperature=0.6, top_k=20, seed=4)
    assert_same_generations(graphs.generate(PROMPTS, **kw), eager.generate(PROMPTS, **kw))
    assert set(graphs._runner._graphs) == captured
    cfg = SearchConfig(candidates=3, boundary=" ", max_steps=3, max_step_tokens=8, seed=2)
    a, b = graphs.search(PROMPTS, config=cfg), eager.search(PROMPTS, config=cfg)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for ra, rb in zip(a, b):
        for sa, sb in zip(ra.steps, rb.steps):
            assert sa.candidate_scores == pytest.approx(sb.candidate_scores, abs=1e-4)
    # Two heads under one shared weight vector: the graph samples from the merged head.
    noise = torch.randn(policy.heads.shape[1:], generator=torch.Generator().manual_seed(0))
    two = Policy(policy.model, policy.tokenizer,
                 torch.cat([policy.heads, policy.heads + 0.05 * noise.to(policy.heads.device)]),
                 ["acc", "eng"])
    runs = [Engine(two, max_batch=3, max_seq_len=96, cuda_graphs=g).generate(
        PROMPTS, head_weights=[0.3, 0.7], max_new_tokens=12, temperature=0) for g in (True, False)]
    assert_same_generations(*runs)
