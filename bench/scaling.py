"""``scaling`` bench section: accuracy against compute for every test-time method (sampling,
majority vote, best-of-N and PRM-weighted voting, step search, beam search, per-candidate head
weights against a fixed mix), on the quality bench's task and trained artefacts
(`bench.quality.scaling` measures, `bench.quality.scaling_report` writes).

Runs only when named (``--sections scaling``): from an empty cache it trains the quality pipeline's
artefacts first, far more than the default ``python -m bench`` may add. The full form (3 seeds,
100 held-out problems, every point) runs without ``--quick``; ``--quick`` runs 1 seed, 30 problems,
fewer points. Rows are yielded as they are measured (``--budget`` and Ctrl-C keep them); the
markdown and PNGs are written when the section ends, also when it is cut short (from the rows so
far, marked partial). Beside the bench JSON ``<stem>.json``: ``<stem>.md`` (every point),
``<stem>.png`` (accuracy vs generated tokens), ``<stem>-head-weights.png``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.quality.settings import QualityConfig, preset
from bench.quality.scaling import ScalingConfig, measure, scaling_preset

# The quality preset whose task and trained artefacts the curves use: the long task (5-8 steps),
# where per-step choices can matter.
QUALITY_PRESET = "long"


def outputs(out_json: Path) -> dict[str, Path]:
    """The section's files named from the bench JSON path."""
    stem = out_json.with_suffix("")
    return {"markdown": stem.with_suffix(".md"), "png": stem.with_suffix(".png"),
            "head_weights_png": stem.with_name(stem.name + "-head-weights.png"),
            "calibration_png": stem.with_name(stem.name + "-calibration.png")}


def machine() -> str:
    """The machine the wall times were measured on, as the files state it."""
    import platform

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch threads "
            f"{torch.get_num_threads()}, {gpu}")


def run_scaling(cfg: QualityConfig, sc: ScalingConfig, out_json: Path, *,
                no_cache: bool = False, cache_root: Path | None = None,
                log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Train or load the artefacts of ``cfg``, yield every measured row, and write the outputs
    (also when stopped early: then from the rows so far, marked partial)."""
    # Imported here: the pipeline brings in the engine and the trainers (seconds).
    from bench.quality import scaling_report as report
    from bench.quality.pipeline import splits, train_or_load
    from bench.quality.prm_quality import calibration_png, prm_quality

    art = train_or_load(cfg, no_cache=no_cache, root=cache_root, log=log)
    files = outputs(out_json)
    # The PRM's quality on held-out rollouts (cached beside the artefacts once measured); a
    # config without held-out PRM problems (the short task's) has none to report.
    prm_stats = prm_quality(art, cfg, log=log) if cfg.n_prmq else None
    problems = splits(dataclasses.replace(cfg, n_test=sc.n_test))["test"]
    rows: list[dict[str, Any]] = []
    stamp = _dt.datetime.now(_dt.timezone.utc)
    complete = False
    try:
        for row in measure(art, cfg, sc, problems, log=log):
            rows.append(row)
            yield row
        complete = True
    finally:
        if rows:
            title = (f"Scaling curves: {len(problems)} held-out problems x {len(sc.seeds)} seed(s)"
                     f"{'' if complete else ' (PARTIAL: stopped early)'}")
            header = (f"Date {stamp:%Y-%m-%d %H:%M} UTC; machine: {machine()}; artefacts: "
                      f"{art.root}. Sampling: temperature {cfg.temperature}, top-k {cfg.top_k}, "
                      f"at most {cfg.max_new_tokens} new tokens; pool of {sc.samples} samples per "
                      f"problem; head-weights request mix (w_acc, w_style) = {tuple(sc.head_mix)}.")
            minutes = (_dt.datetime.now(_dt.timezone.utc) - stamp).total_seconds() / 60
            header += f" Measured in {minutes:.1f} min (training or loading excluded)."
            extra = report.prm_markdown(prm_stats, files["calibration_png"].name)
            report.write_outputs(rows, files, title, header, sc.head_mix, extra)
            if prm_stats is not None:
                calibration_png(prm_stats, files["calibration_png"])
            for name, path in files.items():
                if path.exists():
                    log(f"[scaling] wrote {name}: {path}")


def run(ctx) -> Iterator[dict[str, Any]]:
    """The bench section: the full form, or the quick one with ``--quick``."""
    sc = scaling_preset("quick" if ctx.quick else "full")
    cfg = preset(QUALITY_PRESET)
    ctx.note(f"machine: {machine()}; {len(sc.seeds)} seed(s) x {sc.n_test} held-out problems")
    yield from run_scaling(cfg, sc, ctx.out, no_cache=ctx.no_cache)
    ctx.files += [p for p in outputs(ctx.out).values() if p.exists()]
