"""Per-candidate head weights (`SearchConfig.candidate_head_weights`) and compute accounting
(`generated_tokens`, `scored_tokens`) on tiny fp32 checkpoints (CPU), each against an independent
reference: `Engine.generate` with the candidate's weights (same stream), hand counts of the
candidates the scorer was given, full re-scoring with the PRM's objectives taken alone.

One search runs in Triton's interpreter (each candidate against `generate`: the per-slot weight
rows reach the sampling kernel); the others run the engine's CPU path (torch sampling, the CPU
cascade attention), which takes seconds where the interpreter takes minutes: they check the
engine's bookkeeping (which weights a step records, what is counted, how a PRM is weighted),
not the kernels, which have their own tests against references (tests/test_triton_*.py)."""
import json

import pytest
import torch

from mahalo_engine.__main__ import main
from mahalo_engine.engine import (Engine, SearchConfig, Scorer, SharedBackbonePRM,
                                  ValueModelPRM)
from mahalo_engine.models.loader import load_decoder
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.value_model import ValueHead, load_prm, save_prm
from tiny_prm import save_tiny_prm

PROMPTS = ["Question: How many clips", "The quick brown fox jumps over"]
ROWS = [[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: more threads only contend (CI runs two test workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def eager_cpu(monkeypatch):
    """The engine's CPU path instead of Triton's interpreter (see the module's docstring)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def ckpt():
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def two(ckpt):
    """A two-head policy whose heads differ enough that the mixes decode different tokens: head 1
    is head 0 with its vocabulary rows rolled (it prefers token t + 7 where head 0 prefers t)."""
    policy = load_policy(ckpt, dtype=torch.float32)
    return Policy(policy.model, policy.tokenizer,
                  torch.cat([policy.heads, policy.heads.roll(7, dims=1)]), ["acc", "eng"])


@pytest.fixture(scope="module")
def prms(tmp_path_factory, ckpt):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("prms")
    save_tiny_prm(tmp / "other", tiny_checkpoint("qwen2", seed=1))
    save_tiny_prm(tmp / "bridge", tiny_checkpoint("llama", seed=2, vocab_size=400), seed=2)
    torch.manual_seed(3)
    backbone = load_decoder(tiny_checkpoint("qwen2", seed=1), dtype=torch.float32)
    save_prm(tmp / "multi", backbone,
             ValueHead(backbone.config.hidden_size, objectives=["acc", "eng"]), "value",
             AutoTokenizer.from_pretrained(ckpt))
    # The policy's own backbone: its value head serves as a shared-backbone scorer.
    own = load_decoder(ckpt, dtype=torch.float32)
    save_prm(tmp / "own_multi", own, ValueHead(own.config.hidden_size, objectives=["eng", "acc"]),
             "binary", AutoTokenizer.from_pretrained(ckpt))
    return {n: load_prm(tmp / n, dtype=torch.float32)
            for n in ("other", "bridge", "multi", "own_multi")}


class Recording(Scorer):
    """Records every candidate it is given (the test's own view of the search); scores by a
    deterministic function of the tokens so that winners vary between candidates."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], list[list[int]]]] = []  # per step: prompts, rows

    def score(self, cands):
        k = cands.num_candidates
        self.seen.append(([p.text for p in cands.prompts for _ in range(k)], cands.token_ids))
        return torch.tensor([float(sum(t) % 97) for t in cands.token_ids])


class RecordingPRM(ValueModelPRM):
    def __init__(self, prm, **kw) -> None:
        super().__init__(prm, **kw)
        self.seen: list[tuple[list[str], list[list[int]], list[str]]] = []

    def score(self, cands):
        k = cands.num_candidates
        self.seen.append(([p.text for p in cands.prompts for _ in range(k)], cands.token_ids,
                          cands.texts))
        return super().score(cands)


def _steps_of(seen, prompt):
    """Per step of ``prompt``'s request: its candidates' token ids (in candidate order)."""
    return [[t for p, t in zip(prompts, rows) if p == prompt] for prompts, rows, *_ in seen
            if prompt in prompts]


def _normalised(row):
    return [w / sum(row) for w in row]


# -- per-candidate head weights ---------------------------------------------------------------


def test_each_candidate_equals_generate_with_its_weights(two):
    eng = Engine(two, max_batch=2, max_seq_len=96)
    rec = Recording()
    cfg = SearchConfig(candidates=3, temperature=0, boundary=" ", max_steps=2, max_step_tokens=6,
                       scorer=rec, check_every=2, candidate_head_weights=ROWS)
    results = eng.search(PROMPTS, head_weights=[0.5, 0.5], config=cfg)
    distinct = 0
    for prompt, res in zip(PROMPTS, results):
        steps = _steps_of(rec.seen, prompt)
        assert len(steps) == len(res.steps) == 2
        committed = two.tokenizer.encode(prompt)
        for step, cands in zip(res.steps, steps):
            for row, got in zip(ROWS, cands):
                ref = eng.generate([committed], head_weights=row, temperature=0, stop=" ",
                                   max_new_tokens=6)[0]
                assert got == ref.token_ids
            distinct += len({tuple(c) for c in cands}) > 1
            winner = step.candidate_scores.index(max(step.candidate_scores))
            assert step.token_ids == cands[winner]
            assert step.head_weights == pytest.approx(_normalised(ROWS[winner]))
            committed += step.token_ids
    assert distinct >= 2  # the mixes decode different steps: the comparison means something

    # Sampling: step 1's candidate k draws from stream (seed, offset, slot k), as row k of a
    # generate batch of K copies of the prompt with the same seed does.
    cfg = SearchConfig(candidates=3, temperature=1.0, top_k=20, boundary=" ", max_steps=1,
                       max_step_tokens=6, scorer=Recording(), seed=5, check_every=2,
                       candidate_head_weights=ROWS)
    res = eng.search(PROMPTS[:1], config=cfg)[0]
    cands = cfg.scorer.seen[0][1]
    wide = Engine(two, max_batch=3, max_seq_len=96)  # the K copies in one wave: slots 0..K-1
    ref = wide.generate(PROMPTS[:1] * 3, head_weights=ROWS, temperature=1.0, top_k=20, seed=5,
                       stop=" ", max_new_tokens=6)
    assert cands == [g.token_ids for g in ref]
    assert res.generated_tokens == sum(len(g.token_ids) for g in ref)


def test_no_candidate_weights_records_the_requests_weights(two, eager_cpu):
    eng = Engine(two, max_batch=2, max_seq_len=96)
    cfg = SearchConfig(candidates=2, temperature=0, boundary=" ", max_steps=2, max_step_tokens=5,
                       scorer=Recording(), check_every=2)
    weights = [[3.0, 1.0], [0.0, 2.0]]
    for w, res in zip(weights, eng.search(PROMPTS, head_weights=weights, config=cfg)):
        assert all(s.head_weights == pytest.approx(_normalised(w)) for s in res.steps)


def test_spread_form():
    cfg = SearchConfig(candidates=5, candidate_head_weights=0.4)
    got = cfg.candidate_weights(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    # Candidate 0: the request's; then toward head 0, head 1, head 0, head 1 (a = s j / m).
    ref = [[[0.5, 0.5], [0.6, 0.4], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7]],
           [[1.0, 0.0], [1.0, 0.0], [0.8, 0.2], [1.0, 0.0], [0.6, 0.4]]]
    torch.testing.assert_close(got, torch.tensor(ref))
    three = SearchConfig(candidates=4, candidate_head_weights=1.0).candidate_weights(
        torch.tensor([[0.2, 0.3, 0.5]]))
    torch.testing.assert_close(three[0], torch.tensor([[0.2, 0.3, 0.5], [1, 0, 0], [0, 1, 0],
                                                      [0, 0, 1]]))
    zero = SearchConfig(candidates=3, candidate_head_weights=0.0).candidate_weights(
        torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(zero[0], torch.tensor([[0.25, 0.75]] * 3))


def test_spread_search_records_a_spread_mix(two, eager_cpu):
    eng = Engine(two, max_batch=2, max_seq_len=96)
    cfg = SearchConfig(candidates=3, temperature=0, boundary=" ", max_steps=3, max_step_tokens=5,
                       scorer=Recording(), check_every=2, candidate_head_weights=0.5)
    mixes = cfg.candidate_weights(torch.tensor([[0.5, 0.5]]))[0].tolist()
    for res in eng.search(PROMPTS, head_weights=[0.5, 0.5], config=cfg):
        for step in res.steps:
            winner = step.candidate_scores.index(max(step.candidate_scores))
            assert step.head_weights == pytest.approx(mixes[winner])


def test_request_weights_not_candidates_weight_a_multi_objective_prm(two, prms, eager_cpu):
    eng = Engine(two, max_batch=2, max_seq_len=96)
    weights = [[0.9, 0.1], [0.2, 0.8]]
    own = prms["own_multi"]  # objectives in the other order: matched to the heads by name
    for scorer, prm in ((ValueModelPRM(prms["multi"], objectives="request"), prms["multi"]),
                        (ValueModelPRM(prms["multi"], objectives={"acc": 0.7, "eng": 0.3}),
                         prms["multi"]),
                        (SharedBackbonePRM.from_prm(own, two, objectives="request"), own)):
        fixed = getattr(scorer, "objectives", "request")
        cfg = SearchConfig(candidates=2, temperature=0, boundary=" ", max_steps=2,
                           max_step_tokens=5, check_every=2,
                           candidate_head_weights=[[1, 0], [0, 1]], scorer=scorer)
        for prompt, w, res in zip(PROMPTS, weights, eng.search(PROMPTS, head_weights=weights,
                                                               config=cfg)):
            ids = two.tokenizer.encode(prompt)
            for step in res.steps:
                ids += step.token_ids
                acc, eng_ = (prm.score_full([ids], objectives=o).item() for o in ("acc", "eng"))
                want = dict(zip(("acc", "eng"), w)) if fixed == "request" else fixed
                assert step.score == pytest.approx(want["acc"] * acc + want["eng"] * eng_,
                                                   abs=1e-4)
                # The winner's own mix would give another score: it is not what weighted it.
                mine = step.head_weights[0] * acc + step.head_weights[1] * eng_
                assert abs(mine - step.score) > 1e-3 or step.head_weights == pytest.approx(
                    list(want.values()))


def test_candidate_weight_errors(two, prms, eager_cpu):
    for bad, match in (([[1.0, 0.0]], "has 1 rows .* candidates = 2"),
                       ([[1.0, -0.5], [0.5, 0.5]], "non-negative"),
                       ([[0.0, 0.0], [0.5, 0.5]], "all zero"),
                       ([[float("nan"), 1.0], [0.5, 0.5]], "finite"),
                       ([[1.0, 0.0], [1.0]], "numbers per row"),
                       ([1.0, 0.0], r"must hold H weights in each of 2 rows"),
                       (1.5, r"spread must be a number in \[0, 1\], got 1.5"),
                       (float("inf"), "spread")):
        with pytest.raises(ValueError, match=match):
            SearchConfig(candidates=2, candidate_head_weights=bad)
    for bad in ("0.5", True, {"acc": 1}):
        with pytest.raises(TypeError, match="candidate_head_weights must be None, a spread"):
            SearchConfig(candidates=2, candidate_head_weights=bad)
    eng = Engine(two, max_batch=1, max_seq_len=64)
    cfg = SearchConfig(candidates=2, scorer=Recording(),
                       candidate_head_weights=[[1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"must hold 2 weights in each of 2 rows"):
        eng.search(PROMPTS[:1], config=cfg)
    with pytest.raises(ValueError, match="single output"):
        ValueModelPRM(prms["other"], objectives="request")
    one_head = Engine(load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32), max_batch=1,
                      max_seq_len=64)
    with pytest.raises(ValueError, match=r"PRM objectives \['acc', 'eng'\] are not among"):
        one_head.search(PROMPTS[:1], config=SearchConfig(
            candidates=2, scorer=ValueModelPRM(prms["multi"], objectives="request")))


# -- compute accounting -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fork", "shared_prefix"])
def test_token_accounting_equals_a_hand_count(two, prms, layout, eager_cpu):
    # max_batch=1: the second request waits for the first one's group.
    eng = Engine(two, max_batch=1, max_seq_len=96, cache_layout=layout)
    other, bridge = RecordingPRM(prms["other"]), RecordingPRM(prms["bridge"])
    # Two models: one fed the policy's tokens, one re-tokenising each step's text on its own.
    cfg = SearchConfig(candidates=3, boundary=" ", max_steps=2, max_step_tokens=6, seed=1,
                       scorer=[(other, 0.5), (bridge, 0.5)], check_every=2,
                       candidate_head_weights=0.5)
    for prompt, res in zip(PROMPTS, eng.search(PROMPTS, head_weights=[0.5, 0.5], config=cfg)):
        steps = _steps_of(other.seen, prompt)
        assert len(steps) == len(res.steps) and all(len(c) == 3 for c in steps)
        assert res.generated_tokens == sum(len(t) for cands in steps for t in cands)
        assert res.generated_tokens > len(res.token_ids)  # discarded candidates count
        # The policy's tokens: the prompt's ids, then every candidate's.
        want = len(two.tokenizer.encode(prompt)) + res.generated_tokens
        # Re-tokenised: the prompt, then each candidate's text on its own.
        tok = bridge.prm.tokenizer
        texts = [t for p, _, ts in bridge.seen for q, t in zip(p, ts) if q == prompt]
        assert len(texts) == 3 * len(res.steps)
        want += len(tok.encode(prompt)) + sum(len(tok.encode(t, add_special_tokens=False))
                                              for t in texts)
        assert res.scored_tokens == want


def test_generate_and_unscored_accounting(two, eager_cpu):
    eng = Engine(two, max_batch=2, max_seq_len=96)
    for g in eng.generate(PROMPTS, max_new_tokens=7, stop=" "):
        assert g.generated_tokens == len(g.token_ids) and g.scored_tokens == 0
    cfg = SearchConfig(candidates=2, boundary=" ", max_steps=2, max_step_tokens=5, check_every=2,
                       scorer=lambda prompts, responses: [float(len(r)) for r in responses])
    rec = Recording()
    for res in eng.search(PROMPTS, config=cfg):  # a text callable: 0 scored tokens
        assert res.scored_tokens == 0 and res.generated_tokens >= len(res.token_ids)
    cfg = SearchConfig(candidates=1, boundary=" ", max_steps=2, max_step_tokens=5, check_every=2,
                       scorer=rec)
    for res in eng.search(PROMPTS, config=cfg):  # K = 1: only the committed tokens
        assert res.generated_tokens == len(res.token_ids)


# -- CLI ----------------------------------------------------------------------------------------

COMMON = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "96", "--max-batch", "2"]


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, two):
    from mahalo_engine.heads import save_heads

    tmp = tmp_path_factory.mktemp("cli")
    save_tiny_prm(tmp / "prm", tiny_checkpoint("qwen2", seed=1))
    save_heads(tmp / "heads.safetensors", two.heads, two.objectives)
    return tmp


def test_cli_candidate_head_weights_and_accounting(ckpt, two, heads_dir, capsys, eager_cpu):
    out = heads_dir / "search.jsonl"
    argv = ["search", "--model", str(ckpt), "--heads", str(heads_dir / "heads.safetensors"),
            "--prm", str(heads_dir / "prm"), "--prompt", PROMPTS[0], "-k", "3", "--boundary",
            " ", "--max-steps", "2", "--max-step-tokens", "5", "--check-every", "2", "--seed",
            "3", "--candidate-head-weights", "1,0;0,1;0.3,0.7", "--out", str(out), *COMMON]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    eng = Engine(two, prm=load_prm(heads_dir / "prm", dtype=torch.float32), max_batch=2,
                 max_seq_len=96)
    (ref,) = eng.search(PROMPTS[:1], config=SearchConfig(
        candidates=3, boundary=" ", max_steps=2, max_step_tokens=5, check_every=2, seed=3,
        candidate_head_weights=ROWS))
    assert row["token_ids"] == ref.token_ids
    assert (row["generated_tokens"], row["scored_tokens"]) == (ref.generated_tokens,
                                                              ref.scored_tokens)
    assert [s["head_weights"] for s in row["steps"]] == [s.head_weights for s in ref.steps]
    gen = heads_dir / "gen.jsonl"
    assert main(["generate", "--model", str(ckpt), "--prompt", "a", "--max-new-tokens", "4",
                 "--out", str(gen), *COMMON]) == 0
    assert json.loads(gen.read_text())["generated_tokens"] == 4
    capsys.readouterr()

    base = argv[:argv.index("--candidate-head-weights")]
    for bad, msg in (("1,0;0,1", "has 2 rows for -k 3"),
                     ("1,0;0,-1;1,1", "row 1 must be finite, >= 0 and not all zero"),
                     ("1,0;0,0;1,1", "row 1 must be finite, >= 0 and not all zero"),
                     ("1,0;1;1,1", "rows have [2, 1, 2] weights"),
                     ("1.5", "spread must be in [0, 1], got 1.5"),
                     ("1,0,0;0,1,0;0,0,1", "must hold 2 weights in each of 3 rows")):
        assert main([*base, "--candidate-head-weights", bad, *COMMON]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main([*base, "--candidate-head-weights", "x", *COMMON])
    assert e.value.code == 2 and "expected a spread in [0, 1]" in capsys.readouterr().err
