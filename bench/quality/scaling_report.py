"""The scaling curves' outputs beside the bench JSON: the markdown table of every point (mean ± std
over seeds), the accuracy-vs-generated-tokens PNG (one line per method, log x, error bars) and the
head-weights PNG (per-candidate mixes vs the fixed mix at equal K)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from bench.quality.report import _mean_std

# Plot order and colours of the accuracy curves; the head-weights series get their own plot.
CURVES = (("majority", "majority vote over N", "tab:gray"),
          ("best-of-N", "best-of-N by the PRM (last-step value)", "tab:blue"),
          ("weighted-vote", "PRM-weighted vote over N", "tab:cyan"),
          ("step-search", "step search, K candidates per step", "tab:red"),
          ("beam-search", "beam search, N beams x K", "tab:green"))
HEAD_SERIES = (("fixed-mix", "fixed mix (every candidate at the request's mix)", "tab:purple"),
               ("per-candidate", "per-candidate mixes (w_acc = k/(K-1))", "tab:orange"))
METRICS = ("acc", "style", "objective", "generated_tokens", "scored_tokens", "seconds")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (series, point) in first-seen order: each metric's mean and std over seeds,
    the seeds, the problems per seed and the parser disagreements summed over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["series"], r["point"]), []).append(r)
    out = []
    for (series, point), rs in groups.items():
        entry: dict[str, Any] = {"series": series, "point": point, "seeds": len(rs),
                                 "problems": rs[0]["problems"],
                                 "disagreements": sum(r["disagreements"] for r in rs)}
        for k in ("n", "k", "beams"):
            if k in rs[0]:
                entry[k] = rs[0][k]
        for m in METRICS:
            if m in rs[0]:
                entry[m], entry[m + "_std"] = _mean_std([r[m] for r in rs])
        out.append(entry)
    return out


def _pm(e: dict[str, Any], k: str, fmt: str) -> str:
    s = fmt.format(e[k])
    return s + (" ± " + fmt.format(e[k + "_std"]) if e["seeds"] > 1 else "")


def markdown(rows: list[dict[str, Any]], header: str, extra: str = "") -> str:
    """Every point (acc, style, tokens, PRM tokens, seconds), then the head-weights comparison."""
    agg = aggregate(rows)
    lines = [header, "",
             "### Every point (mean ± std over seeds; tokens and seconds per problem)", "",
             "| series | point | acc | style | generated tokens | PRM tokens | seconds | seeds "
             "| parser disagreements |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in agg:
        lines.append(f"| {e['series']} | {e['point']} | {_pm(e, 'acc', '{:.3f}')} | "
                     f"{_pm(e, 'style', '{:.3f}')} | {_pm(e, 'generated_tokens', '{:.1f}')} | "
                     f"{_pm(e, 'scored_tokens', '{:.1f}')} | {_pm(e, 'seconds', '{:.4f}')} | "
                     f"{e['seeds']} | {e['disagreements']} |")
    heads = [e for e in agg if e["series"] in {s for s, _, _ in HEAD_SERIES}]
    if heads:
        lines += ["", "### Per-candidate head weights vs the fixed mix (MAH-DPO policy)", "",
                  "| series | point | objective | acc | style | generated tokens | PRM tokens "
                  "| seconds |", "|---|---|---|---|---|---|---|---|"]
        for e in sorted(heads, key=lambda e: (e.get("k", 0), e["series"])):
            lines.append(f"| {e['series']} | {e['point']} | {_pm(e, 'objective', '{:.3f}')} | "
                         f"{_pm(e, 'acc', '{:.3f}')} | {_pm(e, 'style', '{:.3f}')} | "
                         f"{_pm(e, 'generated_tokens', '{:.1f}')} | "
                         f"{_pm(e, 'scored_tokens', '{:.1f}')} | {_pm(e, 'seconds', '{:.4f}')} |")
    total = sum(e["disagreements"] for e in agg)
    answers = sum(e["problems"] * e["seeds"] for e in agg)
    lines += ["", f"Answer verdicts behind the table (points x problems x seeds): {answers}; "
              f"math-verify and the task's own parser disagree on {total} of them."]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def _plot_series(ax, agg: list[dict[str, Any]], series: str, label: str, color: str,
                 y: str) -> None:
    pts = sorted((e for e in agg if e["series"] == series), key=lambda e: e["generated_tokens"])
    if not pts:
        return
    xs = [e["generated_tokens"] for e in pts]
    ax.errorbar(xs, [e[y] for e in pts], yerr=[e[y + "_std"] for e in pts],
                xerr=[e["generated_tokens_std"] for e in pts], fmt="-o", color=color,
                label=label, capsize=2, markersize=4, linewidth=1)
    for e in pts:
        ax.annotate(e["point"], (e["generated_tokens"], e[y]), fontsize=6, xytext=(3, -9),
                    textcoords="offset points", color=color)


def _log_x(ax) -> None:
    """Log x axis with plain numbers at 1, 2 and 5 times each power of ten (not 3x10^1)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finish(fig, ax, path: Path, title: str, ylabel: str) -> None:
    _log_x(ax)
    ax.set_xlabel("generated tokens per problem (all candidates and samples, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def curves_png(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """acc vs generated tokens per problem (log x), one line per method, error bars = std over
    seeds (both axes); plain sampling as one black point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=120)
    for series, label, color in CURVES:
        _plot_series(ax, agg, series, label, color, "acc")
    for e in agg:
        if e["series"] == "sampling":
            ax.errorbar([e["generated_tokens"]], [e["acc"]], yerr=[e["acc_std"]], fmt="s",
                        color="black", label="sampling (one sample)", capsize=2)
    _finish(fig, ax, path, title, "accuracy on held-out problems")
    plt.close(fig)


def head_weights_png(rows: list[dict[str, Any]], path: Path, title: str, mix: Sequence[float]
                     ) -> None:
    """The MAH-DPO policy at the request mix: the request-weighted objective, acc and style vs
    generated tokens, fixed mix against per-candidate mixes (error bars = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), dpi=110)
    names = {"objective": f"objective {mix[0]:g}·acc + {mix[1]:g}·style", "acc": "acc",
             "style": "style"}
    for ax, y in zip(axes, ("objective", "acc", "style")):
        for series, label, color in HEAD_SERIES:
            _plot_series(ax, agg, series, label, color, y)
        _log_x(ax)
        ax.set_xlabel("generated tokens per problem (log)")
        ax.set_ylabel(names[y])
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_outputs(rows: list[dict[str, Any]], files: dict[str, Path], title: str, header: str,
                  mix: Sequence[float], extra: str = "") -> None:
    """The markdown (``files["markdown"]``), the curves PNG (``png``) and the head-weights PNG
    (``head_weights_png``, only when those series were measured)."""
    files["markdown"].parent.mkdir(parents=True, exist_ok=True)
    files["markdown"].write_text(markdown(rows, f"## {title}\n\n{header}", extra) + "\n")
    curves_png(rows, files["png"], title)
    if any(r["series"] in {s for s, _, _ in HEAD_SERIES} for r in rows):
        head_weights_png(rows, files["head_weights_png"],
                         title + ": per-candidate head weights vs the fixed mix", mix)


def prm_markdown(stats: dict[str, Any] | None, calibration_file: str) -> str:
    """The PRM's quality (`bench.quality.prm_quality`): AUCs, ECE and the calibration bins."""
    if stats is None:
        return "### PRM quality\n\nNot measured: this task config has no held-out PRM problems."

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    cal = stats["calibration"]
    lines = ["### PRM quality on held-out rollouts (`bench/quality/prm_quality.py`)", "",
             f"Trained on {stats['prm_labelled_steps']} labelled steps. On {stats['problems']} "
             f"held-out problems: {stats['prefixes']} proper prefixes x Monte-Carlo continuations "
             f"= {stats['examples']} step-level examples (positive rate "
             f"{stats['positive_rate']:.3f}). Step-level AUC of the acc value against the "
             f"continuation's correctness: **{num(stats['auc'])}**; final-answer AUC "
             f"({stats['finals']} complete samples, accuracy {stats['final_acc']:.3f}): "
             f"{num(stats['auc_final'])}; ECE {num(cal['ece'])}. Calibration plot: "
             f"`{calibration_file}`.", "",
             "| predicted value bin | prefixes | mean prediction | MC success rate |",
             "|---|---|---|---|"]
    for b in cal["bins"]:
        if b["count"]:
            lines.append(f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['count']} | {b['mean_pred']:.3f} "
                         f"| {b['mc_rate']:.3f} |")
    return "\n".join(lines)
