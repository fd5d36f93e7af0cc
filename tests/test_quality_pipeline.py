"""End-to-end micro run of the quality bench (tiny sizes): every stage leaves a loadable artefact,
and every reported metric equals a recount from the generations file."""
import json

import pytest
import torch

from bench.quality import outputs, run_quality
from bench.quality.settings import preset
from bench.quality.task import extract_answer, style_score, verify


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    lines = []
    # The engine's CPU path (reference sampling), as the bench runs it: the Triton kernels in the
    # interpreter are tested on their own and would make this run minutes long.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        metrics, info = run_quality(preset("micro"), tmp / "out" / "bench.json",
                                    cache_root=tmp / "cache", log=lines.append)
    return tmp, metrics, info, lines


def test_every_stage_leaves_a_loadable_artefact(micro):
    from mahalo_engine import load_policy, load_prm

    tmp, _, info, lines = micro
    root = tmp / "cache"
    for name in ("sft", "pairs", "dpo_acc", "dpo_style", "mah_dpo", "rollouts", "prm"):
        assert (root / name / "stage.json").is_file(), name
        assert any(line.startswith(f"[quality] {name}: ") for line in lines), name  # one line each
    sft = load_policy(root / "sft" / "policy")
    assert sft.num_heads == 1
    for name, objectives in (("dpo_acc", ["acc"]), ("dpo_style", ["style"]), ("mah_dpo", ["acc", "style"])):
        p = load_policy(root / name / "policy")
        assert p.objectives == objectives
        # DPO moved the weights away from the SFT model
        assert not torch.equal(p.heads[0], sft.heads[0])
    for name in ("acc", "style"):
        rows = [json.loads(x) for x in (root / "pairs" / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    rollouts = [json.loads(x) for x in (root / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and all({"steps", "final_reward", "style_reward"} <= set(r) for r in rollouts)
    steps = [json.loads(x) for x in (root / "prm" / "steps.jsonl").read_text().splitlines()]
    assert steps and all(len(lab) == 2 for r in steps for lab in r["labels"])
    prm = load_prm(root / "prm" / "prm")
    assert prm.objectives == ["acc", "style"] and prm.kind == "value"


def test_reported_metrics_equal_a_recount_of_the_generations(micro):
    tmp, metrics, info, _ = micro
    files = outputs(tmp / "out" / "bench.json")
    assert files["png"].stat().st_size > 1000 and files["png"].read_bytes()[:4] == b"\x89PNG"
    md = files["markdown"].read_text()
    assert "Table A" in md and "Table B" in md and "Table C" in md and "Pareto" in md and "Cost" in md
    gens = [json.loads(x) for x in files["generations"].read_text().splitlines()]
    keys = {"config", "seed", "problem_id", "question", "gold", "text", "pred", "correct",
            "style_score", "tokens"}
    assert gens and all(set(g) == keys for g in gens)
    for g in gens:  # each row's own fields are consistent with its text
        assert g["pred"] == extract_answer(g["text"])
        assert g["correct"] == verify(g["text"], g["gold"])
        assert g["style_score"] == pytest.approx(style_score(g["text"]), abs=1e-6)
    seen = set()
    for m in metrics:
        rows = [g for g in gens if g["config"] == m["config"] and g["seed"] == m["seed"]]
        assert len(rows) == m["n"] > 0
        assert m["acc"] == pytest.approx(sum(g["correct"] for g in rows) / len(rows))
        assert m["style"] == pytest.approx(sum(g["style_score"] for g in rows) / len(rows))
        assert m["tokens"] == pytest.approx(sum(g["tokens"] for g in rows) / len(rows))
        seen.add((m["config"], m["seed"]))
    assert {(g["config"], g["seed"]) for g in gens} == seen
    configs = {m["config"] for m in metrics}
    assert {"sft", "dpo[acc]", "dpo[style]", "mah w_acc=0.5", "mah w_acc=0.5 +prm",
            "sft +search prm[acc]", "sft best-of-K prm[style]"} <= configs


def test_rerun_uses_the_cache(micro):
    from bench.quality.pipeline import train_or_load

    tmp, _, _, _ = micro
    lines = []
    art = train_or_load(preset("micro"), root=tmp / "cache", log=lines.append)
    assert len(lines) == 7 and all(": cached (" in x for x in lines)
    assert art.prm == tmp / "cache" / "prm" / "prm" and art.summaries["sft"]["kept_step"] >= 2
