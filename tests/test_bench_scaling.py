"""The scaling curves: the vote and best-of-N rules against hand-computed examples, every series'
token accounting against a hand count of what the engine and the PRM ran on a micro run, and the
section end to end at micro size writing its files."""
import json

import pytest

from bench.quality.scaling import (NO_ANSWER, Answer, PoolSample, best_of_n, candidate_mixes,
                                   majority_vote, pool_rows, scaling_preset, weighted_vote)


def test_majority_vote_picks_the_most_frequent_answer_ties_to_the_first_seen():
    assert majority_vote([7, 8, 8, None]) == 1  # 8 twice: its first sample
    assert majority_vote([3, 5, 5, 3, None, None]) == 0  # 3 and 5 tie: 3 was seen first
    assert majority_vote([None, 4, 9, 9, 4]) == 1
    assert majority_vote([None, None, 2]) == 2  # missing answers cast no vote
    assert majority_vote([None, None]) is None
    assert majority_vote(["1/2", "0.5", "1/2"]) == 0  # grouped by the key as given


def test_best_of_n_is_the_argmax_ties_to_the_earlier_sample():
    assert best_of_n([0.1, 0.9, 0.3]) == 1
    assert best_of_n([0.2, 0.7, 0.7]) == 1
    assert best_of_n([-1.0]) == 0
    with pytest.raises(ValueError):
        best_of_n([])


def test_weighted_vote_sums_scores_per_answer():
    # 3: 0.9 + 0.2 = 1.1 beats 5: 0.5 + 0.5 = 1.0 (a plain majority would tie them)
    assert weighted_vote([3, 5, 5, 3], [0.9, 0.5, 0.5, 0.2]) == 0
    # 5: 1.0 beats 3: 0.9 (best-of-N would take 3)
    assert weighted_vote([3, 5, 5], [0.9, 0.5, 0.5]) == 1
    assert weighted_vote([None, 4, 6], [5.0, 0.25, 0.25]) == 1  # tie: first seen; None ignored
    assert weighted_vote([None], [1.0]) is None
    with pytest.raises(ValueError):
        weighted_vote([1, 2], [0.5])


def test_candidate_mixes_span_the_segment():
    assert candidate_mixes(2) == [[0.0, 1.0], [1.0, 0.0]]
    assert candidate_mixes(3) == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert candidate_mixes(5)[1] == [0.25, 0.75]
    with pytest.raises(ValueError):
        candidate_mixes(1)


def _sample(key, correct, tokens, prm_tokens, score, style=0.5):
    return PoolSample(Answer(f"\\boxed{{{key}}}", correct, correct, style), key, tokens,
                      prm_tokens, score)


def test_pool_rows_by_hand():
    # problem A: answers 4 (wrong, 10 tokens), 6 (right, 20), 6 (right, 30); PRM likes sample 0
    # problem B: no answer (5 tokens), 2 (right, 7), 3 (wrong, 9); PRM likes sample 2
    pool = [[_sample(4, False, 10, 15, 0.9), _sample(6, True, 20, 25, 0.3),
             _sample(6, True, 30, 35, 0.4)],
            [PoolSample(NO_ANSWER, None, 5, 9, 0.1), _sample(2, True, 7, 11, 0.2),
             _sample(3, False, 9, 13, 0.8)]]
    rows = {(r["series"], r["point"]): r
            for r in pool_rows(0, pool, gen_s=[1.0, 2.0, 4.0], prm_s=[0.5, 0.5, 1.0], ns=(1, 3))}
    assert set(rows) == {("sampling", "N=1"), ("majority", "N=1"), ("best-of-N", "N=1"),
                         ("weighted-vote", "N=1"), ("majority", "N=3"), ("best-of-N", "N=3"),
                         ("weighted-vote", "N=3")}
    s = rows["sampling", "N=1"]
    assert (s["acc"], s["generated_tokens"], s["scored_tokens"], s["seconds"]) == (0.0, 7.5, 0, 0.5)
    assert rows["majority", "N=1"]["acc"] == 0.0  # B's only sample has no answer: wrong
    b1 = rows["best-of-N", "N=1"]
    assert (b1["generated_tokens"], b1["scored_tokens"], b1["seconds"]) == (7.5, 12.0, 0.75)
    m3 = rows["majority", "N=3"]  # A: 6 (twice) right; B: 2 vs 3 tie -> 2 (first seen) right
    assert (m3["acc"], m3["generated_tokens"], m3["scored_tokens"], m3["seconds"]) == \
        (1.0, (60 + 21) / 2, 0, 7.0 / 2)
    b3 = rows["best-of-N", "N=3"]  # A: sample 0 (4, wrong); B: sample 2 (3, wrong)
    assert (b3["acc"], b3["scored_tokens"], b3["seconds"]) == (0.0, (75 + 33) / 2, 9.0 / 2)
    w3 = rows["weighted-vote", "N=3"]  # A: 6 has 0.7 < 4's 0.9 -> wrong; B: 3 (0.8) -> wrong
    assert w3["acc"] == 0.0


def test_presets():
    full, quick = scaling_preset("full"), scaling_preset("quick")
    assert len(full.seeds) == 3 and full.sample_ns == (1, 2, 4, 8, 16) == \
        tuple(n for n in full.sample_ns if n <= full.samples)
    assert full.search_ks == (2, 4, 8) and full.beam_shapes == ((2, 2), (2, 4), (4, 2), (4, 4))
    assert quick.n_test < full.n_test and len(quick.seeds) < len(full.seeds)
    with pytest.raises(ValueError, match="preset"):
        scaling_preset("huge")
    with pytest.raises(ValueError, match="sample_ns"):
        type(full)(samples=4, sample_ns=(1, 8))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A micro run of the section with every engine and PRM call it makes recorded."""
    from bench.quality.pipeline import train_or_load
    from bench.quality.settings import preset
    from bench.scaling import outputs, run_scaling
    from mahalo_engine import Engine
    from mahalo_engine.engine.scorers import ValueModelPRM
    from mahalo_engine.value_model import ValueModel

    tmp = tmp_path_factory.mktemp("scaling")
    calls = []  # ("generate", generated tokens) / ("search", candidate tokens, prompt tokens)
    #             / ("prm", tokens read)
    gen, search, score, start, full = (Engine.generate, Engine.search, ValueModelPRM.score,
                                       ValueModelPRM.start, ValueModel.score_full)

    def rec_generate(self, prompts, **kw):
        out = gen(self, prompts, **kw)
        calls.append(["generate", sum(len(g.token_ids) for g in out)])
        return out

    def rec_search(self, prompts, **kw):
        calls.append(["search", 0, 0])
        return search(self, prompts, **kw)

    def rec_score(self, cands):
        calls[-1][1] += sum(len(t) for t in cands.token_ids)
        return score(self, cands)

    def rec_start(self, slots, prompts):
        calls[-1][2] += sum(len(p.ids) for p in prompts)
        return start(self, slots, prompts)

    def rec_full(self, token_ids, **kw):
        calls.append(["prm", sum(len(t) for t in token_ids)])
        return full(self, token_ids, **kw)

    with pytest.MonkeyPatch.context() as mp:
        # The engine's CPU path, as the bench runs it (the interpreter would take minutes).
        mp.setenv("TRITON_INTERPRET", "0")
        train_or_load(preset("micro"), root=tmp / "cache", log=lambda _: None)  # not recorded
        for cls, name, fn in ((Engine, "generate", rec_generate), (Engine, "search", rec_search),
                              (ValueModelPRM, "score", rec_score),
                              (ValueModelPRM, "start", rec_start),
                              (ValueModel, "score_full", rec_full)):
            mp.setattr(cls, name, fn)
        out = tmp / "out" / "bench.json"
        rows = list(run_scaling(preset("micro"), scaling_preset("micro"), out,
                                cache_root=tmp / "cache", log=lambda _: None))
    return rows, calls, outputs(out)


def test_every_series_token_accounting_equals_a_hand_count(micro_run):
    rows, calls, _ = micro_run
    sc = scaling_preset("micro")
    n = sc.n_test
    by = {(r["series"], r["point"]): r for r in rows}
    # the pool: `samples` generate calls, each followed by one PRM scoring call
    pool, rest = calls[:2 * sc.samples], calls[2 * sc.samples:]
    gens = [c[1] for c in pool if c[0] == "generate"]
    reads = [c[1] for c in pool if c[0] == "prm"]
    assert len(gens) == len(reads) == sc.samples
    for k in sc.sample_ns:
        for series in ("majority", "best-of-N", "weighted-vote"):
            r = by[series, f"N={k}"]
            assert r["generated_tokens"] * n == pytest.approx(sum(gens[:k]))
            assert r["scored_tokens"] * n == pytest.approx(0 if series == "majority"
                                                           else sum(reads[:k]))
    # then every search in the order the series run: the tokens of every candidate the PRM
    # scored (all the policy sampled, discarded ones included) and the prompts plus candidates
    # the PRM encoded
    searches = [c for c in rest if c[0] == "search"]
    order = [f"K={k}" for k in sc.search_ks] + [f"{b}x{k}" for b, k in sc.beam_shapes]
    series = ["step-search"] * len(sc.search_ks) + ["beam-search"] * len(sc.beam_shapes)
    for k in sc.head_ks:
        order += [f"K={k}", f"K={k}"]
        series += ["fixed-mix", "per-candidate"]
    assert len(searches) == len(order)
    for (_, cand_tokens, prompt_tokens), s, point in zip(searches, series, order):
        r = by[s, point]
        assert r["generated_tokens"] * n == cand_tokens, (s, point)
        assert r["scored_tokens"] * n == cand_tokens + prompt_tokens, (s, point)
    mix_sample = [c for c in rest if c[0] == "generate"]
    assert len(mix_sample) == 1 and by["fixed-mix", "K=1"]["generated_tokens"] * n == \
        mix_sample[0][1]


def test_section_writes_its_files(micro_run):
    rows, _, files = micro_run
    assert {r["series"] for r in rows} == {"sampling", "majority", "best-of-N", "weighted-vote",
                                           "step-search", "beam-search", "fixed-mix",
                                           "per-candidate"}
    md = files["markdown"].read_text()
    for r in rows:
        assert f"| {r['series']} | {r['point']} |" in md
    assert "math-verify and the task's own parser disagree on" in md
    for key in ("png", "head_weights_png"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(rows)  # rows reach the bench JSON as they are
