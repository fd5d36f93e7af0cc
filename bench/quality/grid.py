"""The quality bench's recipe choice on the validation split: train every grid point of
``bench.quality.settings`` (MAH-DPO recipes, single-head DPO lrs), evaluate each on the validation
problems, apply the written rule (`SELECTION_RULE`), and report every point (the ablation).
``hypervolume`` is also how the report compares the methods' test fronts."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from bench.quality.settings import RECORDED_RECIPE, SELECTION_RULE, MahRecipe, mah_grid

OBJECTIVES = ("acc", "style")


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by ``points`` (both coordinates maximised) above ``ref``: the union of the
    rectangles [ref, p] over the points."""
    pts = sorted(((x - ref[0], y - ref[1]) for x, y in points if x > ref[0] and y > ref[1]),
                 key=lambda p: -p[0])
    area, best_y = 0.0, 0.0
    for i, (x, y) in enumerate(pts):
        best_y = max(best_y, y)
        next_x = pts[i + 1][0] if i + 1 < len(pts) else 0.0
        area += (x - next_x) * best_y
    return area


def front_points(front: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    return [(f["acc"], f["style"]) for f in front]


def recipe_dict(mah: MahRecipe, dpo_lr: dict[str, float]) -> dict[str, Any]:
    return {"mah": dataclasses.asdict(mah), "dpo_lr": dict(dpo_lr)}


def mah_recipe(recipe: dict[str, Any]) -> MahRecipe:
    return MahRecipe(**recipe["mah"])


def choose(pl, log=None) -> dict[str, Any]:
    """The recipe (``{"recipe", "searched", "rule", "mah_grid", "dpo_grid"}``) for pipeline ``pl``:
    with ``cfg.search_grid`` every grid run is trained (cached), evaluated on validation and the
    rule applied (written to ``<root>/recipe.json``); without it, ``RECORDED_RECIPE`` as is."""
    cfg = pl.cfg
    log = log or pl.log
    if not cfg.search_grid:
        out = {"recipe": recipe_dict(RECORDED_RECIPE.mah, RECORDED_RECIPE.dpo_lr), "searched": False,
               "rule": SELECTION_RULE, "mah_grid": [], "dpo_grid": []}
        log(f"[quality] recipe: the full form's recorded choice (no grid trained here): "
            f"MAH-DPO {RECORDED_RECIPE.mah.name}, DPO lr {RECORDED_RECIPE.dpo_lr}")
        return out
    dpo_rows = []
    for o in OBJECTIVES:
        for lr in cfg.dpo_lrs:
            f = pl.validation_front(pl.dpo_run([o], lr=lr), [None])[0]
            dpo_rows.append({"objective": o, "lr": lr, "acc": f["acc"], "style": f["style"]})
            log(f"[quality] validation dpo[{o}] lr {lr:g}: acc {f['acc']:.3f}, style {f['style']:.3f}")
    dpo_lr = {}
    for o in OBJECTIVES:
        best = None
        for r in (r for r in dpo_rows if r["objective"] == o):  # ascending lr: ties keep the smaller
            if best is None or r[o] > best[o]:
                best = r
        dpo_lr[o] = best["lr"]
        best["chosen"] = True
    mah_rows, best = [], None
    weights = [[w, round(1.0 - w, 12)] for w in cfg.grid_sweep]
    for rec in mah_grid(cfg):
        front = pl.validation_front(pl.mah_run(rec), weights)
        row = {**dataclasses.asdict(rec), "front": front,
               "hypervolume": hypervolume(front_points(front))}
        mah_rows.append(row)
        log(f"[quality] validation mah {rec.name}: hypervolume {row['hypervolume']:.4f}, front "
            + ", ".join(f"w_acc={f['w'][0]:g} ({f['acc']:.2f}, {f['style']:.2f})" for f in front))
        if best is None or row["hypervolume"] > best["hypervolume"]:
            best = row
    best["chosen"] = True
    chosen = MahRecipe(best["backbone_lr"], best["head_lr"], best["rpo_alpha"])
    out = {"recipe": recipe_dict(chosen, dpo_lr), "searched": True, "rule": SELECTION_RULE,
           "mah_grid": mah_rows, "dpo_grid": dpo_rows,
           "matches_recorded": chosen == RECORDED_RECIPE.mah and dpo_lr == RECORDED_RECIPE.dpo_lr}
    (pl.root / "recipe.json").write_text(json.dumps(out, indent=1))
    log(f"[quality] recipe chosen on validation: MAH-DPO {chosen.name}, DPO lr {dpo_lr}"
        + ("" if out["matches_recorded"] else " (differs from RECORDED_RECIPE in "
           "bench/quality/settings.py, which the quick form trains: update it)"))
    return out


def ablation_markdown(selection: dict[str, Any]) -> str:
    """Every grid point's validation front, the chosen one marked."""
    if not selection["searched"]:
        r = selection["recipe"]
        return ("### Recipe\n\nThe quick form trains the recipe the full form chose on validation "
                f"(recorded in bench/quality/settings.py): MAH-DPO {mah_recipe(r).name}, DPO lr "
                f"{r['dpo_lr']}. Rule: {selection['rule']}.\n")
    lines = ["### Ablation: the MAH-DPO recipe grid on the validation split (chosen: **bold**)", "",
             f"Rule: {selection['rule']}.", "",
             "| backbone lr | head lr | rpo_alpha | w_acc=1 (acc, style) | w_acc=0.5 | w_acc=0 "
             "| hypervolume |", "|---|---|---|---|---|---|---|"]
    for r in selection["mah_grid"]:
        by_w = {f["w"][0]: f for f in r["front"]}
        cells = [f"{by_w[w]['acc']:.2f}, {by_w[w]['style']:.2f}" if w in by_w else "–"
                 for w in (1.0, 0.5, 0.0)]
        row = [f"{r['backbone_lr']:g}", f"{r['head_lr']:g}", f"{r['rpo_alpha']:g}", *cells,
               f"{r['hypervolume']:.4f}"]
        if r.get("chosen"):
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "### Single-head DPO learning rate on the validation split (chosen: **bold**)", "",
              "| objective | lr | acc | style |", "|---|---|---|---|"]
    for r in selection["dpo_grid"]:
        row = [f"dpo[{r['objective']}]", f"{r['lr']:g}", f"{r['acc']:.3f}", f"{r['style']:.3f}"]
        if r.get("chosen"):
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
