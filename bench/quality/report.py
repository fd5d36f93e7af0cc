"""The quality bench's outputs beside the bench JSON: the markdown tables (A, B, C, the fronts with
their hypervolumes, the sweeps, cost, the recipe ablation), the Pareto PNG and
``<stem>-generations.jsonl``."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from bench.quality.evaluate import Spec
from bench.quality.grid import hypervolume

# Each method's front: (label, table tag of its sweep specs, mode of those specs or None for any)
FRONTS = (("MAH-DPO heads", "sweep", "sample"), ("MAH-DPO heads + PRM-guided search", "sweep", "search"),
          ("DPO Soup", "soup", None), ("Logit ensemble of DPO[acc], DPO[style]", "ensemble", None))

TABLE_TITLES = {
    "A": "Table A: training-time alignment (the paper's Table 2): SFT, single-head DPO per "
         "objective, MAH-DPO head mixes, and the baselines at the same mixes (DPO Soup "
         "λ·DPO[acc] + (1−λ)·DPO[style]; logit ensemble of the two DPO models)",
    "B": "Table B: test-time guidance (Table 3): SFT sampling vs PRM-guided step search (K "
         "candidates per step) vs best-of-K by the PRM's final score",
    "C": "Table C: synergy (Table 5): MAH-DPO head mixes without and with PRM guidance (PRM "
         "objective weights = head weights)",
    "sweep": "Pareto sweep: MAH-DPO head weight w_acc (style weight 1 - w_acc), with and without "
             "PRM guidance",
    "soup": "DPO Soup sweep: λ (weight of DPO[acc]'s parameters)",
    "ensemble": "Logit-ensemble sweep: w_acc (weight of DPO[acc]'s logits; two backbones)",
    "cost": "Cost: PRM-guided step search with the PRM's own slot cache (ours) vs a scorer that "
            "re-encodes every candidate's whole sequence",
}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(metrics: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: mean and std over seeds of acc, style, tokens, seconds."""
    by: dict[str, list[dict[str, Any]]] = {}
    for m in metrics:
        by.setdefault(m["config"], []).append(m)
    out = {}
    for name, ms in by.items():
        row: dict[str, Any] = {"config": name, "seeds": len(ms)}
        for k in ("acc", "style", "tokens", "seconds"):
            row[k], row[k + "_std"] = _mean_std([m[k] for m in ms])
        out[name] = row
    return out


def _cell(row: dict[str, Any], k: str) -> str:
    fmt = {"acc": "{:.3f}", "style": "{:.3f}", "tokens": "{:.1f}", "seconds": "{:.2f}"}[k]
    s = fmt.format(row[k])
    return s + (" ± " + fmt.format(row[k + "_std"]) if row["seeds"] > 1 else "")


def same_answers(generations: list[dict[str, Any]], a: str, b: str) -> tuple[int, int]:
    """(answers of config ``a`` identical to config ``b``'s for the same problem and seed, total)."""
    other = {(g["seed"], g["problem_id"]): g["text"] for g in generations if g["config"] == b}
    mine = [g for g in generations if g["config"] == a]
    return sum(other.get((g["seed"], g["problem_id"])) == g["text"] for g in mine), len(mine)


def front_specs(specs: list[Spec], tag: str, mode: str | None) -> list[Spec]:
    return [s for s in specs if tag in s.table and (mode is None or s.mode == mode)]


def fronts(metrics: list[dict[str, Any]], specs: list[Spec]) -> list[dict[str, Any]]:
    """Per method: the hypervolume (reference (0, 0)) of its mean front over seeds, and the mean ±
    std over seeds of each seed's own front's hypervolume."""
    agg = aggregate(metrics)
    out = []
    for label, tag, mode in FRONTS:
        names = [s.config for s in front_specs(specs, tag, mode) if s.config in agg]
        if not names:
            continue
        seeds = sorted({m["seed"] for m in metrics if m["config"] in names})
        per_seed = [hypervolume([(m["acc"], m["style"]) for m in metrics
                                 if m["config"] in names and m["seed"] == sd]) for sd in seeds]
        mean, std = _mean_std(per_seed)
        out.append({"method": label, "points": len(names),
                    "hypervolume": hypervolume([(agg[n]["acc"], agg[n]["style"]) for n in names]),
                    "hypervolume_per_seed": mean, "hypervolume_per_seed_std": std,
                    "seeds": len(seeds)})
    return out


def markdown(metrics: list[dict[str, Any]], specs: list[Spec], header: str,
             generations: list[dict[str, Any]] | None = None, extra: str = "") -> str:
    agg = aggregate(metrics)
    lines = [header, ""]
    fr = fronts(metrics, specs)
    if fr:
        lines += ["### Fronts: hypervolume of each method's (acc, style) front, reference point (0, 0)",
                  "", "| method | points | hypervolume (mean front) | per-seed hypervolume | seeds |",
                  "|---|---|---|---|---|"]
        for f in fr:
            per = f"{f['hypervolume_per_seed']:.4f}" + (
                f" ± {f['hypervolume_per_seed_std']:.4f}" if f["seeds"] > 1 else "")
            lines.append(f"| {f['method']} | {f['points']} | {f['hypervolume']:.4f} | {per} | "
                         f"{f['seeds']} |")
        lines.append("")
    for table, title in TABLE_TITLES.items():
        names = [s.config for s in specs if table in s.table and s.config in agg]
        if not names:
            continue
        lines += [f"### {title}", "", "| config | acc | style | tokens | seconds | seeds |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            r = agg[n]
            lines.append(f"| {n} | {_cell(r, 'acc')} | {_cell(r, 'style')} | {_cell(r, 'tokens')} "
                         f"| {_cell(r, 'seconds')} | {r['seeds']} |")
        if table == "cost":
            for o in ("acc", "style"):
                ours, base = agg.get(f"cost: sft +search prm[{o}] ours"), \
                    agg.get(f"cost: sft +search prm[{o}] re-encode")
                if ours and base and ours["seconds"] > 0:
                    same = ""
                    if generations is not None:
                        n, tot = same_answers(generations, ours["config"], base["config"])
                        same = f"; identical answers {n}/{tot}"
                    lines.append(f"\nprm[{o}]: re-encode / ours wall time = "
                                 f"{base['seconds'] / ours['seconds']:.2f}x{same}")
        lines.append("")
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def pareto_png(metrics: list[dict[str, Any]], specs: list[Spec], path: Path, title: str) -> None:
    """acc (y) vs style (x) for every method's sweep (MAH-DPO with and without PRM guidance, DPO
    Soup, logit ensemble), points labelled by the weight, error bars = std over seeds; SFT and the
    single-head DPO models as reference points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(metrics)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for (label, tag, mode), color in zip(FRONTS, colors):
        pts = [(s, agg[s.config]) for s in front_specs(specs, tag, mode) if s.config in agg]
        if not pts:
            continue
        xs, ys = [r["style"] for _, r in pts], [r["acc"] for _, r in pts]
        ax.errorbar(xs, ys, xerr=[r["style_std"] for _, r in pts], yerr=[r["acc_std"] for _, r in pts],
                    fmt="-o", color=color, label=label, capsize=2, markersize=4, linewidth=1)
        for (s, r) in pts:
            w = s.head_weights[0] if s.head_weights is not None else float(s.policy.split(":")[1])
            ax.annotate(f"{w:.1f}", (r["style"], r["acc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=color)
    for name, marker in (("sft", "s"), ("dpo[acc]", "^"), ("dpo[style]", "v")):
        if name in agg:
            r = agg[name]
            ax.errorbar([r["style"]], [r["acc"]], xerr=[r["style_std"]], yerr=[r["acc_std"]],
                        fmt=marker, color="black", label=name, capsize=2)
    ax.set_xlabel("style (judge score, higher = more concise)")
    ax.set_ylabel("acc (held-out accuracy)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_generations(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
