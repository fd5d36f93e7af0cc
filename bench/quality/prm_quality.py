"""How good the bench's PRM is, measured on rollouts it never trained on: the step-level AUC of
its ``acc`` values against Monte-Carlo correctness, and a calibration table / plot.

Definitions (``prm_quality``):

- **Held-out problems**: the task's ``prmq`` split (``cfg.n_prmq`` problems); the PRM trains on
  rollouts of the ``prm`` split only, and the splits are disjoint by construction.
- **Rollouts**: the SFT policy's sample on each problem (steps s_1..s_n, cut at ``"\\n\\n"``) plus
  ``cfg.mc_rollouts`` (M) continuations sampled from every proper prefix s_1..s_k (k = 1..n-1),
  with the bench's sampling settings (`bench.quality.pipeline.policy_rollouts`, seed 5000).
- **Step-level examples**: one per (proper prefix, continuation): score = the PRM's acc value
  V(prompt, s_1..s_k), read at the prefix's last token exactly as step search reads it; label =
  1 if that continuation's finished answer is correct (the task's ``verify``), else 0. A prefix's
  **MC success rate** is the mean of its M labels: the Monte-Carlo estimate of P(correct | prefix).
- **AUC** (``auc``): P(score of a random positive example > score of a random negative one), ties
  counting 1/2 — the Mann–Whitney U statistic over n_pos · n_neg, from mid-ranks.
- **Final-answer AUC** (``auc_final``, reported beside it): one example per complete sample
  (k = n, EOS appended as the PRM saw finished answers in training), label = its correctness:
  the PRM as an outcome verifier.
- **Reference checker** (``reference_checks``, computed from the stage's files): a prefix is
  *right so far* when its steps equal the first steps of the problem's reference worked solution
  (whitespace aside). ``auc_reference`` is the AUC of that 0/1 checker against the same step-level
  labels (what an exact arithmetic checker would reach: a yardstick for ``auc``);
  ``auc_detect_wrong`` the AUC of the PRM's value at telling right-so-far prefixes from wrong ones;
  ``success_after_right`` / ``success_after_wrong`` the MC success rates after each kind.
- **Calibration**: proper prefixes grouped into ``bins`` equal-width bins of predicted value on
  [0, 1] (values clipped); per bin the count of prefixes, their mean prediction and their mean MC
  success rate; ``ece`` = the count-weighted mean |prediction − success rate|. With γ = 1 (the long
  preset) the PRM's acc target is exactly this success probability; with γ < 1 it is discounted
  by the remaining steps and calibration is not expected.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench.quality import answers
from bench.quality.pipeline import (Artefacts, Pipeline, _eos_text_of, _read_jsonl, _write_jsonl,
                                    policy_rollouts, prompt_of, train_or_load)
from bench.quality.settings import PRESETS, QualityConfig, preset, task_module
from mahalo_engine import ValueModel, load_prm
from mahalo_engine.text import encode_prompt, encode_step

ROLLOUT_SEED = 5000
CALIBRATION_BINS = 10


def auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` by the Mann–Whitney U statistic (mid-ranks for
    ties). Raises ValueError when a class is missing or the lengths differ."""
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length: {len(scores)} vs {len(labels)}")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"AUC needs both classes, got {pos} positive and {neg} negative labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # a run of equal scores shares the mean of its ranks (1-based)
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def calibration(predicted: Sequence[float], success: Sequence[float],
                bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Per equal-width bin of ``predicted`` (clipped to [0, 1]): ``lo``, ``hi``, ``count``,
    ``mean_pred``, ``mc_rate`` (mean of ``success``; None for an empty bin), and the ``ece``."""
    if len(predicted) != len(success):
        raise ValueError(f"predicted and success differ in length: {len(predicted)} vs {len(success)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    groups: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p, s in zip(predicted, success):
        p = min(1.0, max(0.0, float(p)))
        groups[min(bins - 1, int(p * bins))].append((p, float(s)))
    rows, ece = [], 0.0
    for b, g in enumerate(groups):
        row = {"lo": b / bins, "hi": (b + 1) / bins, "count": len(g), "mean_pred": None,
               "mc_rate": None}
        if g:
            row["mean_pred"] = sum(p for p, _ in g) / len(g)
            row["mc_rate"] = sum(s for _, s in g) / len(g)
            ece += len(g) * abs(row["mean_pred"] - row["mc_rate"])
        rows.append(row)
    n = len(predicted)
    return {"bins": rows, "ece": ece / n if n else None}


def prefix_examples(rows: list[dict[str, Any]], m: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prefixes, finals) from `policy_rollouts` rows, which come per trajectory as the sample
    itself (``prefix_len`` = its n steps) then ``m`` continuations after each proper prefix
    k = 1..n-1 (`training.labels.trajectory_rollouts`): each proper prefix with the labels of its
    continuations (``{"prompt", "steps", "labels"}``), each sample with its own ``label``."""
    prefixes, finals, i = [], [], 0
    while i < len(rows):
        traj = rows[i]
        n = traj["prefix_len"]
        if n != len(traj["steps"]):
            raise ValueError(f"row {i} should start a trajectory (prefix_len = its {len(traj['steps'])} "
                             f"steps), got prefix_len {n}")
        finals.append({"prompt": traj["prompt"], "steps": traj["steps"], "label": traj["final_reward"]})
        for k in range(1, n):
            conts = rows[i + 1 + (k - 1) * m: i + 1 + k * m]
            if len(conts) != m or any(c["prefix_len"] != k or c["steps"][:k] != traj["steps"][:k]
                                      for c in conts):
                raise ValueError(f"rows {i + 1 + (k - 1) * m}..: expected {m} continuations of "
                                 f"prefix {k} of the trajectory at row {i}")
            prefixes.append({"prompt": traj["prompt"], "steps": traj["steps"][:k],
                             "labels": [c["final_reward"] for c in conts]})
        i += 1 + (n - 1) * m
    return prefixes, finals


def prm_values(prm: ValueModel, items: list[tuple[str, list[str]]]) -> list[float]:
    """The acc value of ``prm`` (a `load_prm` model, loaded once by the caller) of each (prompt,
    steps) read at the last step's last token (the steps tokenised one by one, as the engine and
    the PRM trainer see them)."""
    tok = prm.tokenizer
    seqs = []
    for prompt, steps in items:
        seqs.append(encode_prompt(tok, prompt) + [t for s in steps for t in encode_step(tok, s)])
    with torch.inference_mode():
        return prm.score_full(seqs, batch_size=64, objectives="acc").float().cpu().tolist()


def prm_quality(art: Artefacts, cfg: QualityConfig, *, rollouts: Path | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """The PRM's quality on held-out rollouts (module docstring), cached as the stage
    ``prm_quality`` under the artefacts' root: ``auc``, ``auc_final``, ``calibration`` (bins, ece),
    the example counts, and ``prm_labelled_steps`` (what the PRM trained on). ``rollouts``: read
    the rows from that ``rollouts.jsonl`` of another ``prm_quality`` stage instead of sampling them
    again — only valid when it was sampled by the same SFT policy and settings (PRM variants of one
    preset): the PRMs are then compared on the very same examples."""
    if not cfg.n_prmq:
        raise ValueError(f"prm_quality needs held-out problems: cfg.n_prmq is 0 (task {cfg.task!r})")
    pl = Pipeline(cfg, art.root, log=log)
    task = task_module(cfg)

    def measure(d: Path) -> dict[str, Any]:
        if rollouts is None:
            _, rows = policy_rollouts(art.sft, pl.data["prmq"], cfg, seed=ROLLOUT_SEED)
        else:
            rows = _read_jsonl(rollouts)
            want = {prompt_of(p) for p in pl.data["prmq"]}
            if {r["prompt"] for r in rows} != want:
                raise ValueError(f"{rollouts}: its prompts are not this config's {len(want)} "
                                 f"held-out prmq problems")
            log(f"[quality] prm_quality: rollouts read from {rollouts} (not sampled again)")
        _write_jsonl(d / "rollouts.jsonl", rows)
        prefixes, finals = prefix_examples(rows, cfg.mc_rollouts)
        eos = _eos_text_of(art.sft)
        prm = load_prm(art.prm)
        pv = prm_values(prm, [(p["prompt"], p["steps"]) for p in prefixes])
        # A boxed (finished) answer is read after its EOS, as the PRM trained on it (`Pipeline._prm`).
        fv = prm_values(prm, [(f["prompt"], f["steps"][:-1] + [f["steps"][-1] + (
            eos if task.extract_answer(f["steps"][-1]) is not None else "")]) for f in finals])
        scores = [v for v, p in zip(pv, prefixes) for _ in p["labels"]]
        labels = [int(y) for p in prefixes for y in p["labels"]]
        out = {"problems": len(pl.data["prmq"]), "prefixes": len(prefixes),
               "examples": len(labels), "positive_rate": sum(labels) / max(1, len(labels)),
               "auc": _auc_or_none(scores, labels),
               "finals": len(finals), "final_acc": sum(f["label"] for f in finals) / max(1, len(finals)),
               "auc_final": _auc_or_none(fv, [int(f["label"]) for f in finals]),
               "calibration": calibration(pv, [sum(p["labels"]) / len(p["labels"]) for p in prefixes]),
               "prm_labelled_steps": art.summaries["prm"]["labelled_steps"],
               "verifier": f"{task.__name__}.verify", "artefact": str(d / "rollouts.jsonl"),
               "rollouts_from": str(rollouts) if rollouts is not None else "sampled"}
        _write_jsonl(d / "values.jsonl", [{**p, "value": v} for p, v in zip(prefixes, pv)])
        return out

    pl.stage("prm_quality", measure)
    d = art.root / "prm_quality"
    values = _read_jsonl(d / "values.jsonl")
    rows = _read_jsonl(d / "rollouts.jsonl")
    return {**pl.summaries["prm_quality"], **reference_checks(values, pl.data["prmq"], task.STEP_SEP),
            "answer_check": answer_check(rows, pl.data["prmq"], task)}


def answer_check(rows: list[dict[str, Any]], problems: Sequence[Any], task: Any) -> dict[str, int]:
    """Every rollout's answer checked again by the task's ``verify`` (math-verify, the task's own
    parser as the cross-check): ``checked`` and ``disagreements`` from the `bench.quality.answers`
    tally — a recount from the stage's file, the same whether the stage ran now or was cached."""
    gold = {prompt_of(p): p.answer for p in problems}
    before = answers.cross_check()
    for r in rows:
        task.verify("".join(r["steps"]), gold[r["prompt"]])
    after = answers.cross_check()
    return {k: after[k] - before[k] for k in ("checked", "disagreements")}


def reference_checks(values: list[dict[str, Any]], problems: Sequence[Any],
                     step_sep: str) -> dict[str, Any]:
    """The reference checker's numbers (module docstring) for the prefixes of ``values`` (rows of
    ``values.jsonl``: ``prompt``, ``steps``, ``labels``, ``value``) of ``problems``."""
    ref = {prompt_of(p): [s.strip() for s in p.solution("worked").split(step_sep)] for p in problems}
    right = [int([s.strip() for s in v["steps"]] == ref[v["prompt"]][:len(v["steps"])])
             for v in values]
    labels = [int(y) for v in values for y in v["labels"]]
    per_example = [r for r, v in zip(right, values) for _ in v["labels"]]

    def rate(kind: int) -> float | None:
        ys = [y for r, v in zip(right, values) if r == kind for y in v["labels"]]
        return sum(ys) / len(ys) if ys else None

    return {"right_prefixes": sum(right), "wrong_prefixes": len(right) - sum(right),
            "auc_reference": _auc_or_none(per_example, labels),
            "auc_detect_wrong": _auc_or_none([v["value"] for v in values], right),
            "success_after_right": rate(1), "success_after_wrong": rate(0)}


def _auc_or_none(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """The AUC, or None (logged by the caller's summary as missing) when one class is absent."""
    return auc(scores, labels) if 0 < sum(labels) < len(labels) else None


def calibration_png(stats: dict[str, Any], path: Path) -> None:
    """The calibration plot of ``prm_quality``'s stats: per bin the mean predicted acc value (x)
    against the MC success rate (y), the diagonal, each point labelled with its prefix count, and
    the counts as bars beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in stats["calibration"]["bins"] if b["count"]]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(5.5, 6), dpi=120, sharex=True,
                                 gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    xs, ys = [b["mean_pred"] for b in bins], [b["mc_rate"] for b in bins]
    ax.plot(xs, ys, "-o", color="tab:blue", markersize=4, label="PRM acc value")
    for b in bins:
        ax.annotate(str(b["count"]), (b["mean_pred"], b["mc_rate"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7)
    auc_txt = "–" if stats["auc"] is None else f"{stats['auc']:.3f}"
    ax.set_title(f"PRM calibration on held-out prefixes (step AUC {auc_txt}, "
                 f"ECE {stats['calibration']['ece']:.3f})", fontsize=9)
    ax.set_ylabel("Monte-Carlo success rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    allb = stats["calibration"]["bins"]
    bx.bar([(b["lo"] + b["hi"]) / 2 for b in allb], [b["count"] for b in allb],
           width=1 / len(allb) * 0.9, color="tab:blue", alpha=0.6)
    bx.set_xlabel("predicted acc value (bin)")
    bx.set_ylabel("prefixes")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.quality.prm_quality --preset long --out DIR``: train (or load) the
    preset's artefacts, measure the PRM on held-out rollouts, write ``DIR/<name>.json`` (the
    stats) and ``DIR/<name>.png`` (the calibration plot)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.quality.prm_quality",
                                 description=main.__doc__.split("\n\n")[0].replace("``", ""))
    ap.add_argument("--preset", default="long", help=f"one of {', '.join(PRESETS)} (default long)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and PNG")
    ap.add_argument("--name", default="prm-quality", help="file stem (default prm-quality)")
    args = ap.parse_args(argv)
    if args.preset not in PRESETS:
        ap.error(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    cfg = preset(args.preset)
    if not cfg.n_prmq:
        ap.error(f"--preset {args.preset!r} has no held-out PRM-quality problems (n_prmq = 0)")
    art = train_or_load(cfg)
    stats = prm_quality(art, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"preset": args.preset, "artefacts": str(art.root), **stats}, indent=1) + "\n")
    calibration_png(stats, args.out / f"{args.name}.png")
    print(f"[quality] PRM quality: step AUC {stats['auc']}, final-answer AUC {stats['auc_final']}, "
          f"ECE {stats['calibration']['ece']}; wrote {args.out / (args.name + '.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
