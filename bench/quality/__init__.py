"""``quality`` bench section: the paper's results in miniature on a generated, verifiable task.

SFT -> preference pairs from the policy's own samples -> single-head DPO per objective and MAH-DPO,
their recipes chosen on the validation split -> Monte-Carlo rollouts -> a multi-objective value PRM
-> evaluation on held-out problems (Tables A/B/C, Pareto sweeps over head weights with and without
PRM guidance beside the DPO Soup and logit-ensemble baselines, hypervolumes, best-of-K, search
cost, the recipe ablation). Modules: `task` (problems, verifier, judge), `config` (sizes, presets,
cache key, recipe grid and rule), `pipeline` (training stages, cached), `grid` (the validation
choice, hypervolume), `ensemble` (the two-model baseline), `evaluate` (configurations,
generations), `report` (markdown, PNG).

Beside the bench JSON (``<stem>.json``) it writes ``<stem>-quality.md``, ``<stem>-pareto.png`` and
``<stem>-generations.jsonl``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.quality.settings import QualityConfig, preset


def outputs(out_json: Path) -> dict[str, Path]:
    """The section's files named from the bench JSON path."""
    stem = out_json.with_suffix("")
    return {"markdown": stem.with_name(stem.name + "-quality.md"),
            "png": stem.with_name(stem.name + "-pareto.png"),
            "generations": stem.with_name(stem.name + "-generations.jsonl")}


def run_quality(cfg: QualityConfig, out_json: Path, *, no_cache: bool = False,
                cache_root: Path | None = None, header: str = "",
                log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train (or load) every artefact, evaluate, write the outputs; returns (metric rows, info)."""
    # Imported here: the pipeline and the evaluation bring in the engine and the trainers
    # (seconds), which users of the task alone (`bench.quality.task`) need not load.
    from bench.quality import report
    from bench.quality.evaluate import evaluate
    from bench.quality.grid import ablation_markdown
    from bench.quality.pipeline import splits, train_or_load

    t0 = time.perf_counter()
    art = train_or_load(cfg, no_cache=no_cache, root=cache_root, log=log)
    t_train = time.perf_counter() - t0
    problems = splits(cfg)["test"]
    metrics, generations, specs = evaluate(art, cfg, problems, log=log)
    files = outputs(out_json)
    report.write_generations(generations, files["generations"])
    title = (f"MAHALO quality bench: {len(problems)} held-out problems x {len(cfg.seeds)} seed(s), "
             f"K={cfg.candidates}")
    md = report.markdown(metrics, specs, header or f"## {title}", generations,
                         extra=ablation_markdown(art.selection))
    files["markdown"].parent.mkdir(parents=True, exist_ok=True)
    files["markdown"].write_text(md + "\n")
    report.pareto_png(metrics, specs, files["png"], title)
    for name, path in files.items():
        log(f"[quality] wrote {name}: {path}")
    info = {"train_seconds": round(t_train, 1),
            "eval_seconds": round(time.perf_counter() - t0 - t_train, 1),
            "artefacts": str(art.root), "stages": art.summaries,
            "selection": art.selection, "fronts": report.fronts(metrics, specs),
            "files": {k: str(v) for k, v in files.items()}}
    return metrics, info


def run(ctx) -> list[dict[str, Any]]:
    """The bench section: the quick preset with ``--quick`` or as part of the default section list,
    the full one (3 seeds) when named with ``--sections`` without ``--quick``."""
    cfg = preset("quick" if ctx.quick or ctx.all_sections else "full")
    metrics, info = run_quality(cfg, ctx.out, no_cache=ctx.no_cache)
    stages = ", ".join(f"{k} {v.get('seconds')} s" for k, v in info["stages"].items())
    ctx.note(f"training time of each stage when it was trained: {stages}")
    sel = info["selection"]
    ctx.note(("recipe chosen on the validation split by the grid: " if sel["searched"] else
              "recipe: the full form's recorded choice (the quick form trains no grid): ")
             + json.dumps(sel["recipe"]))
    ctx.note("fronts' hypervolumes (reference (0, 0)): " + ", ".join(
        f"{f['method']} {f['hypervolume']:.4f}" for f in info["fronts"]))
    ctx.note(f"trained artefacts: {info['artefacts']} (training/loading {info['train_seconds']} s, "
             f"evaluation {info['eval_seconds']} s); tables: {info['files']['markdown']}; plot: "
             f"{info['files']['png']}; generations: {info['files']['generations']}")
    return [{k: m[k] for k in ("config", "seed", "acc", "style", "tokens", "seconds")}
            for m in metrics]
