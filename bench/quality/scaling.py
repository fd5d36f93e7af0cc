"""Compute-scaling curves of every test-time method: accuracy against the tokens each one generates.

On held-out ``test`` problems of a quality task, with the quality pipeline's trained artefacts (SFT
policy, MAH-DPO heads, multi-objective value PRM), for each sampling seed:

- **pool**: ``samples`` (16) answers per problem from the SFT policy, drawn as ``samples`` separate
  `Engine.generate` calls over all problems (sample j with seed ``1000·seed + j``), each timed; the
  PRM scores every answer once (`ValueModel.score_full`, re-encoding prompt + answer), each batch
  timed. From the same pool, for N in ``sample_ns`` (the first N samples of each problem):
  - ``sampling``: the first sample alone (N = 1);
  - ``majority``: majority vote over the N answers (the standard baseline; `majority_vote`);
  - ``best-of-N``: the answer with the highest PRM score (`best_of_n`);
  - ``weighted-vote``: the answer whose PRM scores summed over the samples giving it is highest
    (search-and-learn's "weighted best-of-N"; `weighted_vote`).
- ``step-search``: `Engine.search` with K in ``search_ks`` candidates per ``"\\n\\n"`` step, the
  PRM's acc output picking each step's winner.
- ``beam-search``: the same with ``beams`` = N partial solutions, each expanding K candidates, for
  (N, K) in ``beam_shapes``.
- on the multi-head (MAH-DPO) policy at the request mix ``head_mix`` (w_acc, w_style) with the PRM
  weighted alike: ``fixed-mix`` (every candidate samples with the request's mix) against
  ``per-candidate`` (candidate k samples with row k of `candidate_mixes`) at equal K in
  ``head_ks``; plus ``fixed-mix`` K = 1, plain sampling at the mix.

Compute, per problem: ``generated_tokens`` = every token the policy sampled for the problem,
including discarded candidates and beams and the unchosen samples (the engine's
``generated_tokens`` for search; the sum over the N samples for the pool's methods);
``scored_tokens`` = every token the PRM ran through its model (the engine's ``scored_tokens`` for
search; for best-of-N and weighted voting the N prompt + answer sequences ``score_full``
re-encodes); ``seconds`` = wall time per problem (the pool's methods: the first N generation calls,
plus their PRM scoring where the method reads scores).

Settings: rule written down before any test number was seen
-----------------------------------------------------------
Nothing here is tuned on the test split, and nothing is tuned at all: every setting is fixed a
priori. Sampling (temperature, top_k, max_new_tokens) is the quality pipeline's, shared with
training and with the ``quality`` section (its validation split chose the trained artefacts, not
these). Step and beam search: the ``quality`` section's search settings (``"\\n\\n"`` steps, stop at
a closed ``\\boxed{}``, greedy selection). The PRM aggregation for best-of-N and weighted voting is
the **last-step value** (the PRM's value at the answer's last token as generated, EOS included when
the policy stopped: where step search scores a final step and where the PRM was trained), fixed a
priori, not chosen among min/prod/last. Majority vote: answers are grouped by the task's parsed
final answer (an answer without one casts no vote); ties go to the answer whose first sample comes
first; no answer at all counts as wrong. Best-of-N ties go to the earlier sample. Per-candidate
head weights: K mixes evenly spaced over the whole segment, w_acc = k/(K-1) for k = 0..K-1
(`candidate_mixes`), so the candidates span the front from the style head to the acc head; the
request mix (0.5, 0.5) weights the PRM. Correctness is `bench.quality.answers`' math-verify check;
the task's own parser is the cross-check, and every disagreement is counted (``disagreements``).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from bench.quality.answers import math_verify_equal
from bench.quality.evaluate import search_config
from bench.quality.pipeline import Artefacts, prompt_of
from bench.quality.settings import QualityConfig, task_module
from mahalo_engine import Engine, ValueModelPRM, load_policy, load_prm
from mahalo_engine.text import encode_prompt


@dataclass(frozen=True)
class ScalingConfig:
    """What the curves measure: problems, seeds and every method's compute levels."""

    n_test: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    samples: int = 16  # pool size per problem (the largest N)
    sample_ns: tuple[int, ...] = (1, 2, 4, 8, 16)
    search_ks: tuple[int, ...] = (2, 4, 8)
    beam_shapes: tuple[tuple[int, int], ...] = ((2, 2), (2, 4), (4, 2), (4, 4))  # (beams, K)
    head_ks: tuple[int, ...] = (2, 4, 8)
    head_mix: tuple[float, float] = (0.5, 0.5)  # the request's (w_acc, w_style)

    def __post_init__(self) -> None:
        if self.n_test < 1 or not self.seeds:
            raise ValueError(f"n_test must be >= 1 and seeds non-empty, got {self.n_test}, "
                             f"{self.seeds}")
        if any(not 1 <= n <= self.samples for n in self.sample_ns):
            raise ValueError(f"sample_ns must lie in [1, samples={self.samples}], got "
                             f"{self.sample_ns}")
        if any(k < 2 for k in self.head_ks):
            raise ValueError(f"head_ks must be >= 2 (per-candidate mixes need K >= 2), got "
                             f"{self.head_ks}")


def scaling_preset(name: str) -> ScalingConfig:
    """``full`` (3 seeds, 100 problems, every point), ``quick`` (1 seed, 30 problems, fewer points)
    or ``micro`` (tests)."""
    if name == "full":
        return ScalingConfig()
    if name == "quick":
        return ScalingConfig(n_test=30, seeds=(0,), samples=8, sample_ns=(1, 2, 4, 8),
                             search_ks=(2, 4), beam_shapes=((2, 2),), head_ks=(4,))
    if name == "micro":
        return ScalingConfig(n_test=3, seeds=(0,), samples=4, sample_ns=(1, 2, 4),
                             search_ks=(2,), beam_shapes=((2, 2),), head_ks=(2,))
    raise ValueError(f"scaling preset must be full, quick or micro, got {name!r}")


# -- aggregation rules (module docstring) ---------------------------------------------------------

def majority_vote(answers: Sequence[Any]) -> int | None:
    """Index of the sample the vote returns: the most frequent non-None answer, ties to the answer
    seen first, represented by its first sample; None when no sample has an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest score, ties to the earlier sample."""
    if not scores:
        raise ValueError("best_of_n needs at least one score")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def weighted_vote(answers: Sequence[Any], scores: Sequence[float]) -> int | None:
    """Index of the first sample of the answer with the largest summed score (ties: the answer
    seen first); None when no sample has an answer."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    total: dict[Any, float] = {}
    first: dict[Any, int] = {}
    for i, (a, s) in enumerate(zip(answers, scores)):
        if a is not None:
            total[a] = total.get(a, 0.0) + s
            first.setdefault(a, i)
    if not total:
        return None
    best = max(total, key=lambda a: (total[a], -first[a]))
    return first[best]


def candidate_mixes(k: int) -> list[list[float]]:
    """K head-weight rows evenly spaced over the whole segment: (w_acc, 1 - w_acc) for
    w_acc = j/(K-1), j = 0..K-1."""
    if k < 2:
        raise ValueError(f"per-candidate mixes need K >= 2, got {k}")
    return [[round(j / (k - 1), 6), round(1 - j / (k - 1), 6)] for j in range(k)]


# -- measurement ----------------------------------------------------------------------------------

@dataclass
class Answer:
    """One returned answer of a method for one problem."""

    text: str
    correct: bool  # math-verify's verdict
    parser_correct: bool  # the task's own parser's verdict (the cross-check)
    style: float


# What a vote returns when no sample has a final answer: wrong, and no style (the judge scores a
# text without a boxed answer 0).
NO_ANSWER = Answer("", False, False, 0.0)


@dataclass
class PoolSample:
    answer: Answer
    key: Any  # the parsed final answer the vote groups by (None: no answer)
    tokens: int  # generated
    prm_tokens: int  # prompt + answer, as score_full reads them
    score: float  # the PRM's acc value at the last token


def point_row(series: str, point: str, seed: int, answers: list[Answer], generated: float,
              scored: float, seconds: float, **extra: Any) -> dict[str, Any]:
    """One measured point (means per problem over ``answers``)."""
    n = len(answers)
    row = {"series": series, "point": point, **extra, "seed": seed,
           "acc": sum(a.correct for a in answers) / n,
           "style": sum(a.style for a in answers) / n,
           "generated_tokens": generated / n, "scored_tokens": scored / n,
           "seconds": seconds / n, "problems": n,
           "disagreements": sum(a.correct != a.parser_correct for a in answers)}
    return row


class ScalingRun:
    """Loads the SFT policy, the MAH-DPO policy and the PRM once, then measures each series."""

    def __init__(self, art: Artefacts, cfg: QualityConfig, problems: list[Any]) -> None:
        self.cfg = cfg
        self.task = task_module(cfg)
        self.problems = problems
        self.prompts = [prompt_of(p) for p in problems]
        self.prm = load_prm(art.prm)
        n = len(problems)
        self.sft = Engine(load_policy(art.sft), max_batch=n, max_seq_len=cfg.max_seq_len,
                          cuda_graphs=False)
        self.mah = Engine(load_policy(art.mah_dpo), max_batch=n, max_seq_len=cfg.max_seq_len,
                          cuda_graphs=False)
        self.prompt_ids = [encode_prompt(self.sft.tokenizer, p) for p in self.prompts]

    def answer(self, text: str, p: Any) -> Answer:
        """``text`` judged: math-verify's verdict, the task's own parser's, the style judge."""
        return Answer(text, math_verify_equal(text, p.answer),
                      self.task.extract_answer(text) == p.answer, self.task.style_score(text))

    def pool(self, seed: int, samples: int, tick: Callable[[], None]
             ) -> tuple[list[list[PoolSample]], list[float], list[float]]:
        """(samples per problem, generation seconds per call, PRM seconds per call)."""
        c = self.cfg
        per_problem: list[list[PoolSample]] = [[] for _ in self.problems]
        gen_s, prm_s = [], []
        for j in range(samples):
            t0 = time.perf_counter()
            gens = self.sft.generate(self.prompts, max_new_tokens=c.max_new_tokens,
                                     temperature=c.temperature, top_k=c.top_k,
                                     seed=1000 * seed + j)
            gen_s.append(time.perf_counter() - t0)
            seqs = [ids + list(g.token_ids) for ids, g in zip(self.prompt_ids, gens)]
            t0 = time.perf_counter()
            scores = self.prm.score_full(seqs, batch_size=256, objectives="acc").float().cpu()
            prm_s.append(time.perf_counter() - t0)
            for i, (p, g) in enumerate(zip(self.problems, gens)):
                per_problem[i].append(PoolSample(self.answer(g.text, p),
                                                 self.task.extract_answer(g.text),
                                                 len(g.token_ids), len(seqs[i]),
                                                 float(scores[i])))
            tick()
        return per_problem, gen_s, prm_s

    # search-based methods ----------------------------------------------------------------------

    def search(self, engine: Engine, seed: int, k: int, objectives: Any,
               head_weights: Any = None, **extra: Any) -> tuple[list[Answer], int, int, float]:
        """(answers, generated tokens, PRM tokens, seconds) of one search over every problem."""
        config = search_config(self.cfg, ValueModelPRM(self.prm, objectives=objectives), seed,
                               candidates=k, **extra)
        t0 = time.perf_counter()
        res = engine.search(self.prompts, head_weights=head_weights, config=config)
        seconds = time.perf_counter() - t0
        answers = [self.answer(r.text, p) for r, p in zip(res, self.problems)]
        return (answers, sum(r.generated_tokens for r in res), sum(r.scored_tokens for r in res),
                seconds)


def pool_rows(seed: int, pool: list[list[PoolSample]], gen_s: list[float],
              prm_s: list[float], ns: Sequence[int]) -> list[dict[str, Any]]:
    """The pool's methods at each N in ``ns`` (the first N samples of every problem); ``gen_s`` and
    ``prm_s`` are the seconds of each sample's generation call and PRM scoring call."""
    rows = []
    for n in ns:
        firsts = [ss[:n] for ss in pool]
        gen = sum(s.tokens for ss in firsts for s in ss)
        prm = sum(s.prm_tokens for ss in firsts for s in ss)
        t_gen, t_prm = sum(gen_s[:n]), sum(prm_s[:n])
        if n == 1:
            rows.append(point_row("sampling", "N=1", seed, [ss[0].answer for ss in firsts],
                                  gen, 0, t_gen, n=1))
        votes = [majority_vote([s.key for s in ss]) for ss in firsts]
        rows.append(point_row("majority", f"N={n}", seed,
                              [ss[v].answer if v is not None else NO_ANSWER
                               for ss, v in zip(firsts, votes)], gen, 0, t_gen, n=n))
        best = [best_of_n([s.score for s in ss]) for ss in firsts]
        rows.append(point_row("best-of-N", f"N={n}", seed,
                              [ss[b].answer for ss, b in zip(firsts, best)], gen, prm,
                              t_gen + t_prm, n=n))
        weighted = [weighted_vote([s.key for s in ss], [s.score for s in ss]) for ss in firsts]
        rows.append(point_row("weighted-vote", f"N={n}", seed,
                              [ss[v].answer if v is not None else NO_ANSWER
                               for ss, v in zip(firsts, weighted)], gen, prm,
                              t_gen + t_prm, n=n))
    return rows


def measure(art: Artefacts, cfg: QualityConfig, sc: ScalingConfig, problems: list[Any], *,
            log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Every point of every series for every seed, each row yielded as soon as it is measured
    (the pool's methods together, once the seed's pool is drawn). An empty ``search_ks``,
    ``beam_shapes`` or ``head_ks`` leaves that series out."""
    from tqdm.auto import tqdm

    run = ScalingRun(art, cfg, problems)
    w = list(sc.head_mix)
    mix_objectives = {"acc": w[0], "style": w[1]}
    per_seed = sc.samples + len(sc.search_ks) + len(sc.beam_shapes) + 1 + 2 * len(sc.head_ks)
    bar = tqdm(total=len(sc.seeds) * per_seed, desc="scaling", unit="run")
    try:
        with torch.inference_mode():
            for seed in sc.seeds:
                pool, gen_s, prm_s = run.pool(seed, sc.samples, lambda: bar.update(1))
                yield from pool_rows(seed, pool, gen_s, prm_s, sc.sample_ns)
                for k in sc.search_ks:
                    ans, gen, prm, secs = run.search(run.sft, seed, k, "acc")
                    bar.update(1)
                    yield point_row("step-search", f"K={k}", seed, ans, gen, prm, secs, k=k)
                for beams, k in sc.beam_shapes:
                    ans, gen, prm, secs = run.search(run.sft, seed, k, "acc", beams=beams)
                    bar.update(1)
                    yield point_row("beam-search", f"{beams}x{k}", seed, ans, gen, prm, secs,
                                    beams=beams, k=k)
                t0 = time.perf_counter()
                gens = run.mah.generate(run.prompts, head_weights=w,
                                        max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, top_k=cfg.top_k, seed=seed)
                secs = time.perf_counter() - t0
                bar.update(1)
                yield _mix_row("fixed-mix", "K=1", seed,
                               [run.answer(g.text, p) for g, p in zip(gens, problems)],
                               sum(len(g.token_ids) for g in gens), 0, secs, w, k=1)
                for k in sc.head_ks:
                    for series in ("fixed-mix", "per-candidate"):
                        extra = {"candidate_head_weights": candidate_mixes(k)} \
                            if series == "per-candidate" else {}
                        ans, gen, prm, secs = run.search(run.mah, seed, k, mix_objectives,
                                                         head_weights=w, **extra)
                        bar.update(1)
                        yield _mix_row(series, f"K={k}", seed, ans, gen, prm, secs, w, k=k)
    finally:
        bar.close()
    log(f"[scaling] measured {len(sc.seeds)} seed(s) x {len(problems)} problems")


def _mix_row(series: str, point: str, seed: int, answers: list[Answer], gen: float, prm: float,
             secs: float, w: list[float], **extra: Any) -> dict[str, Any]:
    row = point_row(series, point, seed, answers, gen, prm, secs, **extra)
    row["objective"] = w[0] * row["acc"] + w[1] * row["style"]
    return row
