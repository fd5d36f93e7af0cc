"""Beam step search (`SearchConfig(beams=N)`) on a tiny policy, in both cache layouts, against
independent references: a brute-force enumeration of the same tree (every candidate re-sampled
from full forwards, no cache, by the sampling op at its slot's random stream), fresh encodings of
every beam's text (policy and PRM caches after a promote that duplicated a survivor), and
``beams=1`` against the same reference with one beam (greedy step search)."""
import dataclasses
import math
import zlib

import pytest
import torch

from mahalo_engine.cache import KVCache
from mahalo_engine.engine import Beam, Engine, SearchConfig, SearchResult, Step
from mahalo_engine.engine import engine as engine_module
from mahalo_engine.engine.requests import Requests
from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.value_model import load_prm
from tiny_prm import save_tiny_prm
from triton_kernels import multihead_sample

PROMPT = "The quick brown fox jumps over"
LAYOUTS = ("fork", "shared_prefix")


@pytest.fixture(scope="module")
def policy():
    return load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    path = tmp_path_factory.mktemp("prm") / "prm"
    save_tiny_prm(path, tiny_checkpoint("qwen2", seed=1))
    return load_prm(path, dtype=torch.float32)


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()) % 1000)


def crc_scorer(prompts, responses):
    """A deterministic judge on texts (few ties)."""
    return [_crc(r) for r in responses]


def every_third(text: str) -> bool:
    """A stop condition some candidates meet: finished beams before the last step."""
    return len(text) % 3 == 0


# -- the brute-force reference -------------------------------------------------------------------


def _text(tok, ids, special=True):
    return tok.decode(ids, skip_special_tokens=special, clean_up_tokenization_spaces=False)


def reference_search(policy, prompt_ids, *, beams, k, seed, max_steps, max_step_tokens,
                     max_new_tokens, score, stop=None, eos_ids=(), candidates=None,
                     candidate_weights=None, offset=0):
    """The search tree enumerated step by step from full forwards (no cache): candidate k of beam
    b runs in slot b*k + k of the request's group and draws its j-th token of a step with the
    sampling op (`triton_kernels.multihead_sample`: the kernels' stream under TRITON_INTERPRET,
    the reference's on the CPU path) at (seed, offset + j, slot) from a full forward's hidden
    state, offset = the draws of the earlier steps (one
    per decode iteration: with check_every=1 and one request, a step's iterations are its longest
    candidate's tokens). A step ends at EOS, at the first token whose text holds the boundary
    " ", or at its cap. Selection, finishing, duplication and the beams' placement follow the
    rule of `SearchConfig`'s docstring, written out here on plain lists. ``candidates``: a list
    that gets every step's N*K candidates (token ids, slot order). ``candidate_weights``: K
    rows of head weights, candidate position k of every beam sampling with row k (normalised to
    sum 1); None: uniform. ``offset``: the draws made before this request began (a request run
    after another one in the same call, one request at a time)."""
    tok = policy.tokenizer
    width = beams * k
    weights = torch.full((width, policy.heads.shape[0]), 1.0 / policy.heads.shape[0])
    if candidate_weights is not None:
        rows = torch.tensor(candidate_weights, dtype=torch.float32)
        weights = (rows / rows.sum(dim=1, keepdim=True)).repeat(beams, 1)
    live = [[] for _ in range(beams)]  # each beam's generated tokens and steps
    steps = [[] for _ in range(beams)]
    finished, generated = [], 0
    while True:
        toks = [[] for _ in range(width)]
        caps = [min(max_step_tokens, max_new_tokens - len(live[s // k])) for s in range(width)]
        why = [None] * width
        j = 0
        while any(w is None for w in why):
            hidden = torch.zeros(width, policy.config.hidden_size)
            for s in range(width):
                if why[s] is None:
                    ids = torch.tensor([prompt_ids + live[s // k] + toks[s]])
                    hidden[s] = policy.model(ids)[0, -1]
            drawn, _ = multihead_sample(hidden, policy.heads, weights, temperature=1.0, top_k=0,
                                        seed=seed, offset=offset + j)
            for s in range(width):
                if why[s] is not None:
                    continue
                prev = _text(tok, toks[s], special=False)
                toks[s].append(int(drawn[s]))
                if toks[s][-1] in eos_ids:
                    why[s] = "eos"
                elif _text(tok, toks[s], special=False).find(" ", len(prev)) != -1:
                    why[s] = "boundary"
                elif len(toks[s]) >= caps[s]:
                    why[s] = "length"
            j += 1
        offset += j
        generated += sum(map(len, toks))
        if candidates is not None:
            candidates.append(toks)
        texts = [_text(tok, t) for t in toks]
        scores = [float(x) for x in torch.tensor(
            score([_text(tok, live[s // k]) + texts[s] for s in range(width)]),
            dtype=torch.float32)]
        ranked = sorted(range(width), key=lambda s: -scores[s])[:beams]  # stable: ties to low
        survivors = []
        for s in ranked:
            b = s // k
            step = Step(texts[s], toks[s], scores[s], scores[b * k:b * k + k], why[s],
                        weights[s].tolist())
            ids, st = live[b] + toks[s], steps[b] + [step]
            end = ("eos" if why[s] == "eos" else
                   "stop" if stop is not None and stop(_text(tok, ids)) else
                   "max_new_tokens" if len(ids) >= max_new_tokens else
                   "max_steps" if len(st) >= max_steps else None)
            if end is None:
                survivors.append((b, ids, st))
            else:
                finished.append(Beam(_text(tok, ids), ids, st, scores[s], end))
        if len(finished) >= beams or not survivors:
            best = sorted(finished, key=lambda x: -x.score)
            # A text scorer runs no model the engine knows of: 0 scored tokens.
            return SearchResult(best[0].text, best[0].token_ids, best[0].steps,
                                best[0].finish_reason, generated_tokens=generated, beams=best)
        survivors = (survivors * beams)[:beams]
        # Placement: a survivor keeps its beam unless a better one did; the rest fill the
        # beams nobody kept, lowest first.
        taken, placed = set(), []
        for b, _, _ in survivors:
            placed.append(None if b in taken else b)
            taken.add(b)
        free = [b for b in range(beams) if b not in taken]
        for i, (b, ids, st) in enumerate(survivors):
            dst = placed[i] if placed[i] is not None else free.pop(0)
            live[dst], steps[dst] = ids, st


SEARCH = dict(candidates=2, boundary=" ", max_steps=3, max_step_tokens=4, max_new_tokens=9,
              check_every=1, temperature=1.0, top_k=0)


class _Recording(Requests):
    """Requests that record, after every commit, each live request's beams (token ids) and how
    many beams went on from another beam's text (a move that copies more than the prompt)."""

    history: list = []
    moves: list = []
    candidates: list = []  # every step's candidates (token ids)

    def commit(self, step, scores, picks):
        type(self).candidates.append(step.token_ids)
        before = {g: [b.token_ids for b in x.beams] for g, x in enumerate(self.live) if x}
        retired = super().commit(step, scores, picks)
        live = {g: x for g, x in enumerate(self.live) if x is not None}
        type(self).history.append([[list(b.token_ids) for b in x.beams] for x in live.values()])
        type(self).moves.append(sum(
            b.token_ids[:len(b.token_ids) - len(b.steps[-1].token_ids)] != before[g][i]
            for g, x in live.items() for i, b in enumerate(x.beams)))
        return retired


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(engine_module, "Requests", _Recording)
    _Recording.history, _Recording.moves, _Recording.candidates = [], [], []
    return _Recording


def _reference(policy, cfg: SearchConfig, stop=None, candidates=None, offset=0):
    return reference_search(policy, policy.tokenizer.encode(PROMPT), beams=cfg.beams,
                            k=cfg.candidates, seed=cfg.seed, max_steps=cfg.max_steps,
                            max_step_tokens=cfg.max_step_tokens,
                            max_new_tokens=cfg.max_new_tokens, stop=stop, candidates=candidates,
                            candidate_weights=cfg.candidate_head_weights, offset=offset,
                            score=lambda r: crc_scorer(None, r),
                            eos_ids=Engine(policy, max_batch=1, max_seq_len=48).eos_ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_beam_search_equals_brute_force_tree(policy, layout, recording):
    cfg = SearchConfig(beams=3, seed=3, scorer=crc_scorer, stop=[every_third], **SEARCH)
    candidates = []
    expected = _reference(policy, cfg, stop=every_third, candidates=candidates)
    (res,) = Engine(policy, max_batch=1, max_seq_len=48, cache_layout=layout).search(
        [PROMPT], config=cfg)
    # The tree was not trivial: beams finished before the last step, and a step before the last
    # sent a beam on from another beam's text (its next step was sampled from the copy).
    assert any(len(b.steps) < cfg.max_steps for b in expected.beams), "precondition"
    assert any(recording.moves[:-1]), "precondition"
    assert res == expected
    assert recording.candidates == candidates  # every candidate, survivor or not


@pytest.mark.parametrize("layout", LAYOUTS)
def test_subtrees_are_independent_beam_searches_merged(policy, layout):
    """DVTS (``subtrees=M``): M independent beam searches of N/M beams, one request each (run one
    after the other here: max_batch=1), the best finished beam over all of them the result. The
    reference is the brute-force tree per subtree, the second one starting at the draws the
    first made, and the merge written out by hand."""
    cfg = SearchConfig(beams=4, subtrees=2, seed=9, scorer=crc_scorer, stop=[every_third],
                       **SEARCH)
    one = dataclasses.replace(cfg, beams=2, subtrees=1)
    first_steps = []
    first = _reference(policy, one, stop=every_third, candidates=first_steps)
    # With check_every=1 and one request at a time, a step draws once per token of its longest
    # candidate.
    second = _reference(policy, one, stop=every_third,
                        offset=sum(max(map(len, step)) for step in first_steps))
    (res,) = Engine(policy, max_batch=1, max_seq_len=48, cache_layout=layout).search(
        [PROMPT], config=cfg)
    beams = [(b.score, i, n, b) for i, r in enumerate((first, second))
             for n, b in enumerate(r.beams)]
    expected = [b for *_, b in sorted(beams, key=lambda x: (-x[0], x[1], x[2]))]
    # Preconditions: the subtrees explored different texts, and the merge must interleave them
    # (the best beam is the second subtree's, the runner-up the first's).
    assert expected[0] is second.beams[0] and expected[1] is first.beams[0], "precondition"
    assert res.beams == expected
    assert (res.text, res.token_ids, res.steps, res.finish_reason) == \
        (expected[0].text, expected[0].token_ids, expected[0].steps, expected[0].finish_reason)
    assert res.generated_tokens == first.generated_tokens + second.generated_tokens
    # Two requests: each gets its own merged result, in order.
    two = Engine(policy, max_batch=4, max_seq_len=48, cache_layout=layout).search(
        [PROMPT, PROMPT + " the"], config=cfg)
    assert len(two) == 2 and all(len(r.beams) >= 2 for r in two)


@pytest.mark.parametrize("beams, subtrees", [(4, 3), (2, 4), (3, 0)])
def test_bad_subtrees_is_named(beams, subtrees):
    with pytest.raises(ValueError, match=rf"subtrees.*{subtrees}") as e:
        SearchConfig(beams=beams, subtrees=subtrees)
    assert "\n" not in str(e.value)


def test_beams_with_candidate_head_weights_and_token_counts(policy, recording):
    """With per-candidate head weights, candidate position k of every beam samples with row k
    (the reference mixes two heads per slot), each step records the winner's row, and the
    compute counts equal a hand count over every candidate of every beam."""
    from mahalo_engine.policy import Policy

    noise = torch.randn(policy.heads.shape[1:], generator=torch.Generator().manual_seed(0))
    two = Policy(policy.model, policy.tokenizer,
                 torch.cat([policy.heads, policy.heads + 0.5 * noise]), ["acc", "eng"])
    rows = [[1.0, 0.0], [0.25, 0.75]]
    cfg = SearchConfig(beams=3, seed=3, scorer=crc_scorer, stop=[every_third],
                       candidate_head_weights=rows, **SEARCH)
    candidates = []
    expected = _reference(two, cfg, stop=every_third, candidates=candidates)
    (res,) = Engine(two, max_batch=1, max_seq_len=48).search([PROMPT], config=cfg)
    assert res == expected
    assert recording.candidates == candidates
    assert {tuple(s.head_weights) for b in res.beams for s in b.steps} == {(1.0, 0.0),
                                                                           (0.25, 0.75)}
    assert res.generated_tokens == sum(len(t) for step in candidates for t in step) > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_beam_is_greedy_step_search(policy, layout):
    """beams=1 (the default) is today's search: the reference with one beam is plain step search
    (the best of K per step), and the call without ``beams`` gives the same result."""
    cfg = SearchConfig(beams=1, seed=2, scorer=crc_scorer, **SEARCH)
    eng = Engine(policy, max_batch=1, max_seq_len=48, cache_layout=layout)
    (res,) = eng.search([PROMPT], config=cfg)
    assert res == _reference(policy, cfg)
    assert [res] == eng.search([PROMPT], config=SearchConfig(seed=2, scorer=crc_scorer, **SEARCH))
    assert res.beams == [Beam(res.text, res.token_ids, res.steps, res.steps[-1].score,
                              res.finish_reason)]


# -- caches after a promote that duplicated survivors --------------------------------------------


def prefers_stops(prompts, responses):
    return [100.0 * every_third(r) for r in responses]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_caches_after_duplicating_promote_equal_fresh_encodings(policy, prm, layout, recording):
    """Survivors that meet the stop condition finish; the live ones are duplicated up to N beams
    and promoted. After the search every beam's slots (policy and PRM cache) hold its committed
    text exactly as a fresh prefill encodes it, and each slot drew its last step's first token
    from that text's next-token distribution (the promote moved the hidden states too)."""
    n, k = 3, 2
    cfg = SearchConfig(beams=n, candidates=k, boundary=" ", max_steps=4, max_step_tokens=4,
                       check_every=2, seed=4, stop=[every_third],
                       scorer=[(prm, 1.0), (prefers_stops, 1.0)])
    eng = Engine(policy, max_batch=1, max_seq_len=48, cache_layout=layout)
    (res,) = eng.search([PROMPT], config=cfg)
    # The last promote (the beams the final step started from) placed one survivor in two beams
    # and sent beams on from another beam's text (a move copies text past the prompt).
    last = max(i for i, h in enumerate(recording.history) if h)
    (beams,) = recording.history[last]
    assert len({tuple(b) for b in beams}) < n and recording.moves[last], "precondition"
    assert len(res.beams) >= 1
    prompt = policy.tokenizer.encode(PROMPT)
    for b, ids in enumerate(beams):
        text = prompt + ids
        m = len(text)
        for model, storage in ((policy.model, eng._slots.storage), (prm.model, prm_storage(eng))):
            fresh = KVCache.allocate(model.config, 1, 48, dtype=torch.float32, device="cpu")
            model.prefill(fresh, [text], torch.tensor([0]))
            for data in _beam_kv(storage, b, k, m):
                torch.testing.assert_close(data, fresh.data[:, :, 0, :, :m], atol=1e-5, rtol=0)
        full = torch.log_softmax(policy.logits(torch.tensor([text]))[0, -1], dim=-1)
        for slot in range(b * k, b * k + k):
            first = int(eng._runner.tokens[slot, 0])
            assert abs(float(eng._runner.logprobs[slot, 0]) - float(full[first])) < 1e-4


def prm_storage(eng):
    ((_, scorer),) = eng._scorers.values()  # the PRM's one ValueModelPRM (and its cache)
    return scorer.cache


def _beam_kv(storage, b, k, m):
    """The committed positions ``[0, m)`` of beam b's K/V in a cache of either layout."""
    if hasattr(storage, "prefix"):
        assert int(storage.prefix.lens[b]) == m
        return [storage.prefix.data[:, :, b, :, :m]]
    return [storage.data[:, :, s, :, :m] for s in range(b * k, b * k + k)]


# -- sizes and bad input -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_budget_counts_every_beams_slots(policy, layout):
    from mahalo_engine.layouts import slot_layout

    one = slot_layout(layout, 2, 5, 3).nbytes(policy.config, 1, 49, torch.float32)
    assert one == slot_layout(layout, 2, 5).nbytes(policy.config, 3, 49, torch.float32)
    cfg = SearchConfig(beams=3, scorer=crc_scorer, **{**SEARCH, "max_steps": 1})
    ok = Engine(policy, max_batch=None, max_seq_len=48, cache_layout=layout, kv_cache_bytes=one)
    assert len(ok.search([PROMPT], config=cfg)[0].beams) >= 1
    small = Engine(policy, max_batch=None, max_seq_len=48, cache_layout=layout,
                   kv_cache_bytes=one - 1)
    with pytest.raises(ValueError, match=r"beams=3 x candidates=2 = 6 slots") as e:
        small.search([PROMPT], config=cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_beams_is_named(bad):
    with pytest.raises((ValueError, TypeError), match="beams") as e:
        SearchConfig(beams=bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_beams_need_a_scorer(policy):
    with pytest.raises(ValueError, match="beams=2"):
        Engine(policy, max_batch=1, max_seq_len=48).search(
            [PROMPT], config=SearchConfig(candidates=1, beams=2))


# -- the command line ----------------------------------------------------------------------------


def test_cli_beams(tmp_path, capsys):
    """``search --beams N`` returns what the Python API returns, with every finished beam's score
    in the row's "beams"; a bad --beams is one line and exit 2, before any model loads."""
    import json

    from mahalo_engine.__main__ import main

    save_tiny_prm(tmp_path / "prm", tiny_checkpoint("qwen2", seed=1))
    model, out = tiny_checkpoint("qwen2"), tmp_path / "out.jsonl"
    flags = ["--model", str(model), "--prompt", PROMPT, "--device", "cpu", "--dtype", "float32",
             "--max-seq-len", "48", "--max-batch", "1", "-k", "2", "--boundary", " ",
             "--max-steps", "2", "--max-step-tokens", "4", "--check-every", "2", "--seed", "3"]
    assert main(["search", *flags, "--prm", str(tmp_path / "prm"), "--beams", "2", "--out",
                 str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    eng = Engine(load_policy(model, dtype=torch.float32),
                 prm=load_prm(tmp_path / "prm", dtype=torch.float32), max_batch=1, max_seq_len=48)
    (ref,) = eng.search([PROMPT], config=SearchConfig(
        candidates=2, beams=2, boundary=" ", max_steps=2, max_step_tokens=4, check_every=2,
        seed=3))
    assert row["token_ids"] == ref.token_ids and row["text"] == ref.text
    assert [(b["token_ids"], b["finish_reason"]) for b in row["beams"]] == \
        [(b.token_ids, b.finish_reason) for b in ref.beams]
    assert [b["score"] for b in row["beams"]] == pytest.approx([b.score for b in ref.beams],
                                                               rel=1e-5, abs=1e-6)
    # DVTS through the CLI: the same result as the API's (2 subtrees of one beam each).
    dvts = tmp_path / "dvts.jsonl"
    assert main(["search", *flags, "--prm", str(tmp_path / "prm"), "--beams", "2", "--subtrees",
                 "2", "--out", str(dvts)]) == 0
    (row,) = [json.loads(line) for line in dvts.read_text().splitlines()]
    (ref,) = eng.search([PROMPT], config=SearchConfig(
        candidates=2, beams=2, subtrees=2, boundary=" ", max_steps=2, max_step_tokens=4,
        check_every=2, seed=3))
    assert [b["token_ids"] for b in row["beams"]] == [b.token_ids for b in ref.beams]
    assert row["generated_tokens"] == ref.generated_tokens
    for argv, msg in ((["--prm", str(tmp_path / "prm"), "--beams", "0"], "--beams must be >= 1"),
                      (["--beams", "2", "-k", "1"], "--beams 2 needs a PRM"),
                      (["--prm", str(tmp_path / "prm"), "--beams", "4", "--subtrees", "3"],
                       "--subtrees 3 must divide --beams 4")):
        capsys.readouterr()
        assert main(["search", *flags, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_scores_equal_full_rescoring_across_groups(policy, prm, layout, recording):
    """Three requests over two groups (a group reused, the last request moved down) with beams
    that finish early and duplicates: every step score of every finished beam equals a full
    re-encode of its text, by the PRM's own model and by a value head on the policy's backbone
    (`SharedBackbonePRM`: it reads the policy's hidden states, so a wrong policy cache after a
    promote, a move or a reuse would show)."""
    from mahalo_engine.engine import SharedBackbonePRM
    from mahalo_engine.value_model import ValueHead

    torch.manual_seed(5)
    head = ValueHead(policy.config.hidden_size)
    prompts = [PROMPT, "Question: How many clips", "Step 1:"]
    cfg = SearchConfig(beams=2, candidates=2, boundary=" ", max_steps=3, max_step_tokens=4,
                       check_every=2, seed=1, stop=[every_third],
                       scorer=[(prm, 1.0), (SharedBackbonePRM(head, "value"), 1.0)])
    results = Engine(policy, max_batch=2, max_seq_len=48, cache_layout=layout).search(
        prompts, config=cfg)
    assert any(recording.moves), "precondition: a beam went on from another beam's text"
    checked = 0
    for prompt, res in zip(prompts, results):
        # The PRM encoded the prompt once and every candidate (all fit its cache); the value head
        # on the policy's states runs no model of its own.
        assert res.scored_tokens == len(policy.tokenizer.encode(prompt)) + res.generated_tokens
        assert res.beams[0].token_ids == res.token_ids
        assert [b.score for b in res.beams] == sorted((b.score for b in res.beams), reverse=True)
        for beam in res.beams:
            assert beam.score == beam.steps[-1].score
            ids = policy.tokenizer.encode(prompt)
            for step in beam.steps:
                ids = ids + step.token_ids
                with torch.no_grad():
                    own = head(policy.model(torch.tensor([ids]))[0, -1:]).item()
                ref = prm.score_full([ids]).item() + own
                assert step.score == pytest.approx(ref, abs=1e-4)
                assert step.score in step.candidate_scores
                checked += 1
    assert checked > len(prompts) * cfg.max_steps  # more beams than one per request


def test_select_keeps_n_distinct_survivors():
    from mahalo_engine.engine.engine import _select

    gen = torch.Generator().manual_seed(0)
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5], [-math.inf] * 4, [math.nan, 2.0, 1.0, 0.0]])
    assert _select(scores, 3, 0.0, gen) == [[1, 2, 0], [0, 1, 2], [1, 2, 3]]
    # Draws without replacement; a row with fewer than n candidates of probability > 0 takes
    # its best others; a row of -inf takes the ranking.
    two = torch.tensor([[-math.inf, 5.0, -math.inf, 5.0], [-math.inf] * 4])
    firsts = set()
    for _ in range(20):
        picks = _select(two, 3, 1.0, gen)
        assert sorted(picks[0][:2]) == [1, 3] and picks[0][2] == 0 and picks[1] == [0, 1, 2]
        firsts.add(picks[0][0])
    assert firsts == {1, 3}
    drawn = [tuple(_select(torch.zeros(1, 6), 2, 1.0, gen)[0]) for _ in range(200)]
    assert all(a != b for a, b in drawn) and len(set(drawn)) > 15


# -- the batched promote with moves, against a dense reference ------------------------------------

N, KB, GROUPS, STEP, MAX_LEN = 3, 2, 3, 6, 32


def _promote_case(layout_name: str, device: str, graphs: bool) -> int:
    """Random caches (policy and a PRM's) in a layout of N beams x KB candidates whose slots
    hold what a step leaves (every slot of a request shares its prompt, every slot of a beam its
    committed text, each candidate its own step), random survivors with duplicates placed by
    `place_beams`, then `Requests._promote` against plain indexing on a snapshot: every slot of
    new beam b holds its source's text (committed + step), length and hidden state. Repeated
    shapes: on CUDA the promote is captured and replayed. Returns the rounds that had moves."""
    from types import SimpleNamespace

    from mahalo_engine.engine.decode_runner import DecodeRunner
    from mahalo_engine.engine.scorers import ValueModelPRM
    from mahalo_engine.layouts import slot_layout

    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device=device)
    layout = slot_layout(layout_name, KB, STEP, N)
    gen = torch.Generator().manual_seed(0)
    caches = [layout.allocate(policy.config, GROUPS, MAX_LEN, dtype=torch.float32, device=device)
              for _ in range(2)]
    runner = DecodeRunner(policy.model, caches[0], None, max_seq_len=MAX_LEN - 1, eos_ids=[],
                          cuda_graphs=graphs)
    prm = ValueModelPRM(SimpleNamespace(model=SimpleNamespace(device=torch.device(device),
                                                              dtype=torch.float32)))
    prm.slots = caches[1]
    reqs = Requests([], None, None, SearchConfig(candidates=KB, beams=N), layout=layout,
                    cache=caches[0], model=policy.model, runner=runner, sampler=None, scorer=prm,
                    num_groups=GROUPS, max_seq_len=MAX_LEN - 1, text=None, confirm=None)
    width, moved = N * KB, 0
    # (groups, live survivors per group): each repeated so that graphs capture and replay.
    for groups, lives in [([0, 1, 2], [1, 2, 3])] * 3 + [([2, 0], [1, 1])] * 3 + [([1], [3])] * 2:
        sources = []
        for cache in caches:  # (the PRM's prompts are as long as the policy's or not)
            _fill_step(cache, layout_name, groups, gen)
        runner.hidden.copy_(torch.randn(runner.hidden.shape, generator=gen))
        for i, (g, live) in enumerate(zip(groups, lives)):
            picks = (torch.randperm(width, generator=gen)[:live].tolist() * N)[:N]
            places = layout.place_beams([j // KB for j in picks])
            row = [0] * N
            for j, b in zip(picks, places):
                row[b] = g * width + j
            sources.append(row)
            moved += any(row[b] // KB != g * N + b for b in range(N))
        snapshot = [_dense(c) for c in caches], runner.hidden.clone()
        reqs._promote(sources, groups)
        for c, old in zip(caches, snapshot[0]):
            _check_promoted(c, old, sources, groups)
        for i, g in enumerate(groups):
            for b, src in enumerate(sources[i]):
                for d in range(g * width + b * KB, g * width + b * KB + KB):
                    assert torch.equal(runner.hidden[d], snapshot[1][src])
    if graphs:
        assert len(reqs.graphs)
    return moved


def _fill_step(cache, layout_name, groups, gen) -> None:
    """Random K/V with the lengths and shared positions a decoded step leaves."""
    width = N * KB
    for part in (cache.storage,) if layout_name == "fork" else \
            (cache.storage.prefix, cache.storage.suffix):
        part.data.copy_(torch.randn(part.data.shape, generator=gen))
    for g in groups:
        prompt = int(torch.randint(1, 5, (), generator=gen))
        committed = [prompt + int(torch.randint(0, 8, (), generator=gen)) for _ in range(N)]
        step = torch.randint(0, STEP - 1, (width,), generator=gen)
        if layout_name == "fork":
            kv = cache.storage
            base = g * width
            for s in range(base, base + width):
                kv.data[:, :, s, :, :prompt] = kv.data[:, :, base, :, :prompt]
            for b, c in enumerate(committed):
                first = base + b * KB
                for s in range(first, first + KB):
                    kv.data[:, :, s, :, :c] = kv.data[:, :, first, :, :c]
                    kv.lens[s] = c + int(step[s - base])
                    cache.committed[s] = c
                    cache.prompt[s] = prompt
        else:
            st = cache.storage
            for b, c in enumerate(committed):
                p = g * N + b
                st.prefix.data[:, :, p, :, :prompt] = st.prefix.data[:, :, g * N, :, :prompt]
                st.prefix.lens[p] = c
                cache.prompt[p] = prompt
                for s in range(p * KB, p * KB + KB):
                    st.suffix.lens[s] = int(step[s - g * width])


def _dense(cache) -> list[torch.Tensor]:
    """A copy of each candidate slot's K/V over its full text (committed + step)."""
    st = cache.storage
    if hasattr(st, "prefix"):
        return [torch.cat((st.prefix.data[:, :, s // KB, :, :int(st.prefix.lens[s // KB])],
                           st.suffix.data[:, :, s, :, :int(st.suffix.lens[s])]), dim=3).cpu()
                for s in range(st.num_slots)]
    return [st.data[:, :, s, :, :int(st.lens[s])].cpu().clone() for s in range(st.num_slots)]


def _check_promoted(cache, old, sources, groups) -> None:
    st, width = cache.storage, N * KB
    for i, g in enumerate(groups):
        for b, src in enumerate(sources[i]):
            text = old[src]
            m = text.shape[3]
            if hasattr(st, "prefix"):  # the new beam's prefix is its source's full text
                p = g * N + b
                assert int(st.prefix.lens[p]) == m
                assert torch.equal(st.prefix.data[:, :, p, :, :m].cpu(), text)
                assert all(int(st.suffix.lens[s]) == 0 for s in range(p * KB, p * KB + KB))
            else:
                for d in range(g * width + b * KB, g * width + b * KB + KB):
                    assert int(st.lens[d]) == m
                    assert torch.equal(st.data[:, :, d, :, :m].cpu(), text)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_promote_with_duplicates_matches_dense_reference(layout):
    assert _promote_case(layout, "cpu", graphs=False) > 0  # some rounds moved a survivor


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_promote_with_duplicates_replayed_from_cuda_graphs(layout):
    assert _promote_case(layout, "cuda", graphs=True) > 0


def test_place_beams_keeps_every_source_beam():
    """A beam any survivor came from is kept by one of them (so its slots are read, never
    overwritten, by the promote), each beam is taken once, and the best survivor of a beam
    keeps it."""
    from mahalo_engine.layouts import SlotLayout

    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        n = int(torch.randint(1, 6, (), generator=gen))
        origins = torch.randint(0, n, (n,), generator=gen).tolist()
        places = SlotLayout.place_beams(origins)
        assert sorted(places) == list(range(n))
        for b in set(origins):
            assert places[origins.index(b)] == b


# -- CUDA graphs against eager -------------------------------------------------------------------


class _Promotes(Requests):
    """Requests that keep every instance and the key of every captured-or-eager event they run
    (`_run_captured`), so a test can see which promotes a search captured and replayed."""

    made: list = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list = []
        type(self).made.append(self)

    def _run_captured(self, name, host, apply):
        self.calls.append((name, tuple(host.shape)))
        return super()._run_captured(name, host, apply)


GRAPH_BEAMS, GRAPH_K = 3, 2


def first_beam(prompts, responses):
    """+100 for beam 0's candidates (rows are group, beam, candidate; N*K rows per group): the
    top N survivors are beam 0's K candidates (ranked by the PRM) and the best of the others, so
    every step sends a beam on from beam 0's text (a promote with moves of one shape, captured
    at its second use and replayed after)."""
    n, k = GRAPH_BEAMS, GRAPH_K
    return [100.0 * (i % (n * k) < k) for i in range(len(responses))]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_beam_search_with_cuda_graphs_equals_eager(layout, tmp_path, monkeypatch):
    """A beam search with a PRM on CUDA, decode steps and promotes (moves included) replayed from
    CUDA graphs, equals the same search run eagerly on the same device: same tokens, beams and
    end reasons, step scores within float32 summation order (as the other graph tests)."""
    path = tmp_path / "prm"
    save_tiny_prm(path, tiny_checkpoint("qwen2", seed=1))
    prm = load_prm(path, dtype=torch.float32, device="cuda")
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device="cuda")
    monkeypatch.setattr(engine_module, "Requests", _Promotes)
    prompts = ["Question: How many clips", PROMPT, "Step 1:"]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3)):
        cfg = SearchConfig(beams=GRAPH_BEAMS, candidates=GRAPH_K, boundary=" ", max_steps=6,
                           max_step_tokens=6, check_every=2,
                           scorer=[(prm, 1.0), (first_beam, 1.0)], **kw)
        runs = {}
        for graphs in (True, False):
            _Promotes.made = []
            # max_batch=2 with 3 prompts: the third waits, then groups are compacted (moves).
            eng = Engine(policy, max_batch=2, max_seq_len=96, cache_layout=layout,
                         cuda_graphs=graphs)
            runs[graphs] = eng.search(prompts, config=cfg), _Promotes.made
        (graphed, (g_reqs,)), (eager, (e_reqs,)) = runs[True], runs[False]
        assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
        # The graphed search captured a promote with moves (at its shape's second use) and
        # replayed that graph at a later step; the eager one ran the same events uncaptured.
        moved = [key for key in g_reqs.graphs if key[0][0] == "promote" and key[0][1][1] > 0]
        assert moved, f"no promote with moves was captured: {list(g_reqs.graphs)}"
        assert any(g_reqs.calls.count((key[0], key[1])) >= 3 for key in moved), g_reqs.calls
        assert not e_reqs.graphs and e_reqs.calls == g_reqs.calls
        for a, b in zip(graphed, eager):
            assert (a.text, a.finish_reason, a.generated_tokens, a.scored_tokens) == \
                (b.text, b.finish_reason, b.generated_tokens, b.scored_tokens)
            assert len(a.beams) == len(b.beams)
            for x, y in zip(a.beams, b.beams):
                assert (x.token_ids, x.finish_reason) == (y.token_ids, y.finish_reason)
                assert x.score == pytest.approx(y.score, abs=1e-4)
                assert len(x.steps) == len(y.steps)
                for s, t in zip(x.steps, y.steps):
                    assert s.token_ids == t.token_ids
                    assert s.candidate_scores == pytest.approx(t.candidate_scores, abs=1e-4)
