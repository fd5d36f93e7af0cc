"""Evaluation of the trained artefacts on held-out (``test``) problems: plain sampling, PRM-guided
step search and best-of-K, every configuration with the same sampling settings, for each seed;
the baselines' fronts beside MAH-DPO's: DPO Soups (one policy per λ) and the logit ensemble of the
two single-head DPO models (`bench.quality.ensemble`).

Each answer becomes one generations row (``config, seed, problem_id, question, gold, text, pred,
correct, style_score, tokens``); a configuration's metrics are means over its rows, so they can be
recounted from the generations file alone. ``seconds`` is the configuration's wall time (policy and
PRM work together; loading excluded).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import torch

from bench.quality.ensemble import LogitEnsemble
from bench.quality.settings import QualityConfig, task_module
from bench.quality.pipeline import SAMPLING_BOUNDARY, Artefacts, prompt_of
from bench.quality.task import Problem
from mahalo_engine import (Engine, Scorer, SearchConfig, ValueModelPRM, boxed_closed, load_policy,
                           load_prm)
from mahalo_engine.text import encode_prompt


@dataclass(frozen=True)
class Spec:
    """One evaluated configuration.

    mode: ``sample`` (``Engine.generate``), ``search`` (``Engine.search`` with K candidates scored by
    the PRM weighted by ``prm``), ``best_of_k`` (K samples, the PRM's score of each whole answer
    picks one), ``search_reencode`` (``search`` with a scorer that re-encodes every candidate's
    whole sequence: the cost baseline) or ``ensemble`` (the logit ensemble of DPO[acc] and
    DPO[style], weights ``head_weights``).
    """

    config: str
    policy: str  # sft | dpo_acc | dpo_style | mah_dpo | soup:<λ> | ensemble
    head_weights: tuple[float, ...] | None = None
    mode: str = "sample"
    prm: Any = None  # objective weights of the multi-objective PRM: a name or {name: weight}
    table: tuple[str, ...] = field(default_factory=tuple)


def specs(cfg: QualityConfig) -> list[Spec]:
    """Every configuration, each tagged with the tables it appears in."""
    out = [
        Spec("sft", "sft", table=("A", "B")),
        Spec("dpo[acc]", "dpo_acc", table=("A",)),
        Spec("dpo[style]", "dpo_style", table=("A",)),
    ]
    for w in cfg.sweep:
        tag = ("A", "C") if w in (0.0, 0.5, 1.0) else ()
        out.append(Spec(f"mah w_acc={w:.1f}", "mah_dpo", (w, 1.0 - w), table=("sweep",) + tag))
    for w in cfg.sweep:
        tag = ("C",) if w in (0.0, 0.5, 1.0) else ()
        out.append(Spec(f"mah w_acc={w:.1f} +prm", "mah_dpo", (w, 1.0 - w), "search",
                        {"acc": w, "style": 1.0 - w}, table=("sweep",) + tag))
    for w in cfg.sweep:
        tag = ("A",) if w in (0.0, 0.5, 1.0) else ()
        out.append(Spec(f"soup λ={w:.1f}", f"soup:{w}", table=("soup",) + tag))
    for w in cfg.sweep:
        tag = ("A",) if w in (0.0, 0.5, 1.0) else ()
        out.append(Spec(f"ensemble w_acc={w:.1f}", "ensemble", (w, 1.0 - w), "ensemble",
                        table=("ensemble",) + tag))
    out += [
        Spec("sft +search prm[acc]", "sft", mode="search", prm="acc", table=("B",)),
        Spec("sft +search prm[style]", "sft", mode="search", prm="style", table=("B",)),
        Spec("sft best-of-K prm[acc]", "sft", mode="best_of_k", prm="acc", table=("B",)),
        Spec("sft best-of-K prm[style]", "sft", mode="best_of_k", prm="style", table=("B",)),
    ]
    return out


def cost_specs() -> list[Spec]:
    """The timing comparison: our search (the PRM's persistent slot cache) vs re-encoding."""
    return [Spec(f"cost: sft +search prm[{o}] {m}", "sft", mode=mode, prm=o, table=("cost",))
            for o in ("acc", "style")
            for m, mode in (("ours", "search"), ("re-encode", "search_reencode"))]


def search_config(cfg: QualityConfig, scorer: Any, seed: int, **options: Any) -> SearchConfig:
    """The bench's step-search settings: ``"\\n\\n"`` steps, stop at a closed box, the pipeline's
    sampling, ``cfg.candidates`` candidates; ``options`` override or add `SearchConfig` fields."""
    base = dict(candidates=cfg.candidates, boundary=SAMPLING_BOUNDARY,
                max_step_tokens=cfg.max_new_tokens, max_steps=8, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k, seed=seed, scorer=scorer,
                stop=[boxed_closed])
    return SearchConfig(**{**base, **options})


class Evaluator:
    """Loads each policy once (one `Engine` per policy) and the PRM once, then runs `Spec`s."""

    def __init__(self, art: Artefacts, cfg: QualityConfig, max_batch: int) -> None:
        if art.dpo_acc is None or art.dpo_style is None or not art.soups:
            raise ValueError(f"the quality tables need the single-head DPO baselines and soups, but "
                             f"{art.root} was trained with baselines=False (task {cfg.task!r})")
        self.cfg = cfg
        self.task = task_module(cfg)
        self.prm = load_prm(art.prm)
        self.engines: dict[str, Any] = {}
        paths = {"sft": art.sft, "dpo_acc": art.dpo_acc, "dpo_style": art.dpo_style,
                 "mah_dpo": art.mah_dpo, **{f"soup:{lam}": p for lam, p in art.soups.items()}}
        for name, path in paths.items():
            self.engines[name] = Engine(load_policy(path), max_batch=max_batch,
                                        max_seq_len=cfg.max_seq_len, cuda_graphs=False)
        self.ensemble = LogitEnsemble(self.engines["dpo_acc"].policy, self.engines["dpo_style"].policy)

    def run(self, spec: Spec, problems: list[Problem], seed: int) -> tuple[list[dict], float]:
        """(generations rows, wall seconds) of ``spec`` on ``problems``."""
        prompts = [prompt_of(p) for p in problems]
        hw = list(spec.head_weights) if spec.head_weights is not None else None
        c = self.cfg
        t0 = time.perf_counter()
        if spec.mode == "ensemble":
            answers = self.ensemble.generate(prompts, hw[0], max_new_tokens=c.max_new_tokens,
                                             temperature=c.temperature, top_k=c.top_k, seed=seed)
            return ([generation_row(spec.config, seed, p, text, len(ids), self.task)
                     for p, (text, ids) in zip(problems, answers)], time.perf_counter() - t0)
        engine = self.engines[spec.policy]
        if spec.mode == "sample":
            gens = engine.generate(prompts, head_weights=hw, max_new_tokens=c.max_new_tokens,
                                   temperature=c.temperature, top_k=c.top_k, seed=seed)
            answers = [(g.text, g.token_ids) for g in gens]
        elif spec.mode in ("search", "search_reencode"):
            scorer = ValueModelPRM(self.prm, objectives=spec.prm) if spec.mode == "search" \
                else ReencodePRM(self.prm, spec.prm)
            res = engine.search(prompts, head_weights=hw, config=search_config(c, scorer, seed))
            answers = [(r.text, r.token_ids) for r in res]
        elif spec.mode == "best_of_k":
            answers = self._best_of_k(engine, prompts, hw, spec.prm, seed)
        else:
            raise ValueError(f"unknown evaluation mode {spec.mode!r}")
        seconds = time.perf_counter() - t0
        rows = [generation_row(spec.config, seed, p, text, len(ids), self.task)
                for p, (text, ids) in zip(problems, answers)]
        return rows, seconds

    def _best_of_k(self, engine, prompts: list[str], hw, objectives: Any,
                   seed: int) -> list[tuple[str, list[int]]]:
        k = self.cfg.candidates
        flat = [p for p in prompts for _ in range(k)]
        gens = engine.generate(flat, head_weights=hw, max_new_tokens=self.cfg.max_new_tokens,
                               temperature=self.cfg.temperature, top_k=self.cfg.top_k, seed=seed)
        tok = engine.tokenizer
        # Scored at the answer's last token as generated (EOS included when the policy stopped),
        # exactly where step search scores a final step and where the PRM was trained; the prompt
        # ids are the ones the engine generated from.
        seqs = [encode_prompt(tok, p) + list(g.token_ids)
                for p, g in zip(flat, gens)]
        scores = self.prm.score_full(seqs, batch_size=256, objectives=objectives).cpu()
        best = scores.view(len(prompts), k).argmax(1).tolist()
        return [(gens[i * k + b].text, gens[i * k + b].token_ids) for i, b in enumerate(best)]


class ReencodePRM(Scorer):
    """The cost baseline of step search: the same PRM scoring the same candidates, but re-encoding
    each candidate's whole sequence (prompt + committed steps + candidate, the exact token ids the
    policy holds) from scratch with ``score_full``, as a PRM without its own cache must. Picks the
    same winners as `ValueModelPRM` up to float rounding."""

    def __init__(self, prm: Any, objectives: Any) -> None:
        self.prm = prm
        self.objectives = objectives
        self.committed: dict[int, list[int]] = {}  # slot -> prompt + committed step ids
        self.last: dict[int, list[int]] = {}  # slot -> the candidate scored last

    def start(self, slots: torch.Tensor, prompts: list) -> None:
        for group, p in zip(slots.tolist(), prompts):
            for slot in group:
                self.committed[slot] = list(p.ids)

    def score(self, cands) -> torch.Tensor:
        slots = cands.slots.reshape(-1).tolist()
        self.last = {s: list(t) for s, t in zip(slots, cands.token_ids)}
        seqs = [self.committed[s] + list(t) for s, t in zip(slots, cands.token_ids)]
        return self.prm.score_full(seqs, batch_size=256, objectives=self.objectives).float().cpu()

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor) -> None:
        new = {w: self.committed[w] + self.last[w] for w in winners.tolist()}  # steps committed
        self.committed.update(new)
        for w, slot in zip(src.tolist(), dst.tolist()):
            self.committed[slot] = list(new[w])

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for s, d in zip(src.tolist(), dst.tolist()):
            self.committed[d] = list(self.committed[s])


def generation_row(config: str, seed: int, p: Problem, text: str, tokens: int,
                   task: ModuleType) -> dict[str, Any]:
    """One answer's row, judged by ``task`` (the config's task module, `task_module`)."""
    return {"config": config, "seed": seed, "problem_id": p.problem_id, "question": p.question,
            "gold": p.answer, "text": text, "pred": task.extract_answer(text),
            "correct": task.verify(text, p.answer), "style_score": round(task.style_score(text), 6),
            "tokens": tokens}


def summarize(rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """A configuration-and-seed's metrics: means over its generation rows."""
    n = len(rows)
    return {"config": rows[0]["config"], "seed": rows[0]["seed"],
            "acc": sum(r["correct"] for r in rows) / n,
            "style": sum(r["style_score"] for r in rows) / n,
            "tokens": sum(r["tokens"] for r in rows) / n,
            "seconds": round(seconds, 3), "n": n}


def evaluate(art: Artefacts, cfg: QualityConfig, problems: list[Problem],
             log: Callable[[str], None] = print) -> tuple[list[dict], list[dict], list[Spec]]:
    """(metric rows, generation rows, specs) for every spec and seed, then the cost comparison
    (first seed, ``cfg.n_cost`` problems)."""
    from tqdm import tqdm

    all_specs = specs(cfg)
    costs = cost_specs()
    ev = Evaluator(art, cfg, max_batch=max(1, len(problems)))
    metrics, generations = [], []
    total = len(all_specs) * len(cfg.seeds) + len(costs)
    with torch.inference_mode(), tqdm(total=total, desc="evaluate", unit="config") as bar:
        for seed in cfg.seeds:
            for spec in all_specs:
                rows, secs = ev.run(spec, problems, seed)
                generations += rows
                metrics.append(summarize(rows, secs))
                bar.update(1)
        for spec in costs:
            rows, secs = ev.run(spec, problems[:cfg.n_cost], cfg.seeds[0])
            generations += rows
            metrics.append(summarize(rows, secs))
            bar.update(1)
    log(f"[quality] evaluate: {len(all_specs) + len(costs)} configurations ({len(all_specs)} x "
        f"{len(cfg.seeds)} seeds on {len(problems)} held-out problems, {len(costs)} cost "
        f"comparisons on {cfg.n_cost}), {len(generations)} answers")
    return metrics, generations, all_specs + costs
