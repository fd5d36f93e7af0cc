"""PRM training ablation on the long task: retrain only the value PRM of ``preset("long")`` with
one setting changed and measure each variant on the held-out ``prmq`` rollouts
(`bench.quality.prm_quality`), never on the test split.

Each variant is ``dataclasses.replace(preset("long"), **VARIANTS[name])``: its cache key differs,
so the stages it shares with the preset (``SHARED_STAGES``: SFT, pairs, MAH-DPO run, reference
log-probs, PRM-training rollouts; none of them reads a PRM setting) are *copied* from the preset's
cache directory, which this module only reads; the pipeline then skips them by their
``stage.json`` and trains only ``prm`` and measures ``prm_quality``.

Decision rule (`RULE`, written down before any variant's result was seen): the variant with the
highest held-out prmq step-level AUC is recommended; the current preset stays unless a variant
beats it by more than ``MARGIN`` (0.05: the held-out set is 304 prefixes of 60 problems, the
150-vs-300-problem PRMs already differed by 0.03 with no setting of the PRM trainer changed, so
a smaller gap is not told from noise). The variants (`VARIANTS`, also fixed before any result):
``steps600`` trains twice as long (the question asked); ``lr1e-4`` keeps 300 steps at a third of
the lr (the one other change, picked because the preset's PRM is over-spread on held-out
prefixes: predictions span 0-1 while bin success rates stay in 0.52-0.80, a sign of fitting the
4-rollout label noise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

from bench.quality.pipeline import _read_jsonl, train_or_load
from bench.quality.prm_quality import auc, prm_quality
from bench.quality.settings import QualityConfig, preset
from mahalo_engine.utils.paths import cache_dir

MARGIN = 0.05
RULE = ("the variant with the highest held-out prmq step-level AUC is recommended; the current "
        f"preset stays unless a variant beats it by more than {MARGIN}")
BASE = "long"
VARIANTS: dict[str, dict[str, Any]] = {"steps600": {"prm_steps": 600}, "lr1e-4": {"prm_lr": 1e-4}}
# The preset's own PRM retrained under the ablation's conditions (one thread, the same machine
# load): how far a rerun of the same recipe moves the AUC. Not a candidate for the rule.
CONTROL = "preset-rerun"
BOOTSTRAP = 2000  # resamples of the held-out problems for the paired AUC-difference interval
SHARED_STAGES = ("sft", "pairs", "runs", "ref_logps", "rollouts")


def variant_config(name: str) -> QualityConfig:
    """``preset("long")`` with ``VARIANTS[name]`` applied (`CONTROL`: the preset itself);
    ValueError naming the known variants."""
    if name == CONTROL:
        return preset(BASE)
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS) + [CONTROL]}, got {name!r}")
    return dataclasses.replace(preset(BASE), **VARIANTS[name])


def variant_root(name: str) -> Path:
    """The variant's cache directory: its config's key (`CONTROL`: the preset's key + "-rerun",
    so the preset's own directory is never written)."""
    key = variant_config(name).train_key()
    return cache_dir("quality", f"{key}-rerun" if name == CONTROL else key)


def seed_cache(src: Path, dst: Path, stages: tuple[str, ...] = SHARED_STAGES) -> list[str]:
    """Copy (never move) each directory of ``stages`` from ``src`` to ``dst`` (``ref_logps`` is a
    plain cache folder, the others hold a finished stage's ``stage.json``); one ``dst`` already
    has is left alone. Returns the copied names; ValueError when ``src`` lacks one."""
    copied = []
    for s in stages:
        if not (src / s).is_dir() or (s != "ref_logps" and not any((src / s).rglob("stage.json"))):
            raise ValueError(f"{src}: stage {s!r} is not cached there (train preset {BASE!r} first)")
        if (dst / s).exists():
            continue
        shutil.copytree(src / s, dst / s)
        copied.append(s)
    return copied


def recommend(base_auc: float, variants: dict[str, float], margin: float = MARGIN) -> str:
    """`RULE`: the name of the variant with the highest AUC if it beats ``base_auc`` by more than
    ``margin``, else ``"preset"``."""
    if not variants:
        return "preset"
    best = max(variants, key=lambda k: variants[k])
    # rounded: a gain of exactly the margin (0.55 - 0.50 = 0.05000000000000004 in floats) is not more
    return best if round(variants[best] - base_auc, 9) > margin else "preset"


def paired_auc_difference(base: list[dict[str, Any]], other: list[dict[str, Any]], *,
                          resamples: int = BOOTSTRAP, seed: int = 0) -> dict[str, float]:
    """``other``'s step AUC minus ``base``'s on the same held-out prefixes (rows of
    ``values.jsonl``: ``prompt``, ``steps``, ``labels``, ``value``), with a 95 % percentile
    interval from resampling the problems (all of a problem's prefixes together, both models on
    the same draw). ValueError when the two files do not hold the same prefixes and labels."""
    key = [(r["prompt"], r["steps"], r["labels"]) for r in base]
    if key != [(r["prompt"], r["steps"], r["labels"]) for r in other]:
        raise ValueError("the two prm_quality stages measured different rollouts: not paired")
    by_problem: dict[str, list[int]] = {}
    for i, r in enumerate(base):
        by_problem.setdefault(r["prompt"], []).append(i)
    groups = list(by_problem.values())

    def diff(rows: list[int]) -> float | None:
        labels = [int(y) for i in rows for y in base[i]["labels"]]
        if not 0 < sum(labels) < len(labels):
            return None
        a = auc([base[i]["value"] for i in rows for _ in base[i]["labels"]], labels)
        b = auc([other[i]["value"] for i in rows for _ in other[i]["labels"]], labels)
        return b - a

    rng = random.Random(seed)
    draws = [d for _ in range(resamples)
             if (d := diff([i for g in rng.choices(groups, k=len(groups)) for i in g])) is not None]
    draws.sort()
    return {"difference": diff(list(range(len(base)))), "ci95_lo": draws[int(0.025 * len(draws))],
            "ci95_hi": draws[int(0.975 * len(draws)) - 1], "resamples": len(draws),
            "problems": len(groups)}


def run_variant(name: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the variant's PRM on the preset's copied stages and measure it on the
    held-out prmq rollouts (`bench.quality.prm_quality.prm_quality`)."""
    cfg = variant_config(name)
    src, dst = cache_dir("quality", preset(BASE).train_key()), variant_root(name)
    dst.mkdir(parents=True, exist_ok=True)
    log(f"[ablation] {name}: copied {seed_cache(src, dst)} from {src} to {dst}")
    # The preset's held-out rollouts, not sampled again: the same SFT policy and sampling settings
    # would draw them again (minutes on shared cores), and every PRM is then scored on the same
    # examples, so the AUC differences are paired (`paired_auc_difference`).
    return _measure(cfg, dst, log, rollouts=src / "prm_quality" / "rollouts.jsonl")


def summary(names: list[str], *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The preset's and each of ``names``' measured stats side by side (all must be trained and
    measured already: ValueError otherwise), each variant's paired AUC difference to the preset,
    and the `RULE`'s recommendation over the `VARIANTS` among ``names``."""
    cfgs = {"preset": preset(BASE), **{n: variant_config(n) for n in names}}
    roots = {"preset": cache_dir("quality", cfgs["preset"].train_key()),
             **{n: variant_root(n) for n in names}}
    for n, r in roots.items():  # read-only: never train into the preset's directory from here
        if not (r / "prm_quality" / "stage.json").is_file():
            raise ValueError(f"{n}: {r} has no measured prm_quality stage (run --variant {n} first)")
    stats = {n: _measure(cfg, roots[n], log) for n, cfg in cfgs.items()}
    values = {n: _read_jsonl(r / "prm_quality" / "values.jsonl") for n, r in roots.items()}
    rows = {}
    for n, st in stats.items():
        cfg = cfgs[n]
        rows[n] = {"changes": VARIANTS.get(n, {}),  # the preset and CONTROL: none
                   "prm_steps": cfg.prm_steps, "prm_lr": cfg.prm_lr,
                   "auc": st["auc"], "auc_final": st["auc_final"],
                   "ece": st["calibration"]["ece"], "auc_detect_wrong": st["auc_detect_wrong"],
                   "final_mse": st["prm"]["final_mse"], "prm_seconds": st["prm"]["seconds"],
                   "prm_quality_seconds": st["seconds"], "calibration": st["calibration"],
                   "root": st["root"]}
        if n != "preset":
            rows[n]["vs_preset"] = paired_auc_difference(values["preset"], values[n])
    candidates = {n: rows[n]["auc"] for n in names if n in VARIANTS}
    return {"rule": RULE, "margin": MARGIN, "rows": rows,
            "recommendation": recommend(rows["preset"]["auc"], candidates)}


def _measure(cfg: QualityConfig, root: Path, log: Callable[[str], None], *,
             rollouts: Path | None = None) -> dict[str, Any]:
    """The PRM-quality stats of ``cfg``'s artefacts under ``root`` (stages trained or loaded)."""
    art = train_or_load(cfg, root=root, log=log)
    return {"root": str(root), "prm": art.summaries["prm"],
            **prm_quality(art, cfg, rollouts=rollouts, log=log)}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.quality.prm_ablation --variant NAME --out FILE`` trains one variant's PRM
    on the long preset's cached stages and measures it on the held-out prmq rollouts;
    ``--summary NAME,NAME --out FILE`` puts measured variants beside the preset and applies the
    rule."""
    ap = argparse.ArgumentParser(prog="python -m bench.quality.prm_ablation",
                                 description=main.__doc__.replace("``", ""))
    mode = ap.add_mutually_exclusive_group(required=True)
    known = [*VARIANTS, CONTROL]
    mode.add_argument("--variant", help=f"train and measure one of {', '.join(known)}")
    mode.add_argument("--summary", help="comma-separated measured variants to compare")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the stats")
    ap.add_argument("--note", default="", help="free text kept in the JSON (the machine, its load)")
    args = ap.parse_args(argv)
    names = [args.variant] if args.variant else [n for n in args.summary.split(",") if n]
    bad = [n for n in names if n not in known]
    if bad or not names:
        ap.error(f"variants must be among {', '.join(known)}, got {bad or names!r}")
    try:
        out = summary(names) if args.summary else run_variant(args.variant)
    except ValueError as e:
        ap.error(str(e))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rule": RULE, "note": args.note, **out}, indent=1) + "\n")
    if args.summary:
        for n, r in out["rows"].items():
            print(f"[ablation] {n}: step AUC {r['auc']:.3f}, final AUC {r['auc_final']:.3f}, "
                  f"ECE {r['ece']:.3f}, PRM {r['prm_seconds']} s")
        print(f"[ablation] recommendation ({RULE}): {out['recommendation']}; wrote {args.out}")
    else:
        print(f"[ablation] {args.variant}: step AUC {out['auc']}, final AUC {out['auc_final']}, "
              f"ECE {out['calibration']['ece']}, PRM {out['prm']['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
