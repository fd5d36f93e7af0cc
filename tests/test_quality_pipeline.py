"""End-to-end micro run of the quality bench (tiny sizes): every stage leaves a loadable artefact,
the recipe is chosen by the written rule from the validation fronts, and every reported metric
equals a recount from the generations file."""
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
    runs = ["runs/dpo-acc-lr2e-05", "runs/dpo-acc-lr0.0001", "runs/dpo-style-lr2e-05",
            "runs/dpo-style-lr0.0001", "runs/mah-bb0-head0.001-rpo0", "runs/mah-bb0-head0.001-rpo1"]
    for name in ("sft", "pairs", *runs, "rollouts", "prm"):
        assert (root / name / "stage.json").is_file(), name
        assert any(line.startswith(f"[quality] {name}: ") for line in lines), name  # one line each
    sft = load_policy(root / "sft" / "policy")
    assert sft.num_heads == 1
    for name in runs:
        p = load_policy(root / name / "policy")
        assert p.objectives == (["acc", "style"] if "mah" in name else [name.split("-")[1]])
        # DPO moved the heads away from the SFT model; the frozen backbones did not move
        assert not torch.equal(p.heads[0], sft.heads[0])
        if "bb0" in name:
            assert torch.equal(p.model.model.embed_tokens.weight, sft.model.model.embed_tokens.weight)
    soups = sorted((root / "soups").glob("*/lambda*"))
    assert len(soups) == 1 and load_policy(soups[0]).num_heads == 1
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
    assert {"sft", "dpo[acc]", "dpo[style]", "mah w_acc=0.5", "mah w_acc=0.5 +prm", "soup λ=0.5",
            "ensemble w_acc=0.5", "sft +search prm[acc]", "sft best-of-K prm[style]"} <= configs
    assert {f["method"] for f in info["fronts"]} == {
        "MAH-DPO heads", "MAH-DPO heads + PRM-guided search", "DPO Soup",
        "Logit ensemble of DPO[acc], DPO[style]"}
    assert "Ablation" in files["markdown"].read_text()


def test_recipe_is_the_rules_choice_from_the_validation_fronts(micro):
    from bench.quality.grid import hypervolume

    tmp, _, info, _ = micro
    sel = info["selection"]
    assert sel["searched"] and len(sel["mah_grid"]) == 2 and len(sel["dpo_grid"]) == 4
    hv = [hypervolume([(f["acc"], f["style"]) for f in r["front"]]) for r in sel["mah_grid"]]
    assert [r["hypervolume"] for r in sel["mah_grid"]] == hv
    best = max(range(len(hv)), key=lambda i: (hv[i], -i))  # the first of the largest
    assert [bool(r.get("chosen")) for r in sel["mah_grid"]] == [i == best for i in range(len(hv))]
    assert sel["recipe"]["mah"]["rpo_alpha"] == sel["mah_grid"][best]["rpo_alpha"]
    for o in ("acc", "style"):
        rows = [r for r in sel["dpo_grid"] if r["objective"] == o]
        top = max(r[o] for r in rows)
        assert sel["recipe"]["dpo_lr"][o] == min(r["lr"] for r in rows if r[o] == top)


def test_hypervolume_against_hand_areas():
    from bench.quality.grid import hypervolume

    assert hypervolume([(0.5, 0.5)]) == pytest.approx(0.25)
    # two rectangles 0.8 x 0.2 and 0.3 x 0.9 overlapping on 0.3 x 0.2: 0.16 + 0.27 - 0.06
    assert hypervolume([(0.8, 0.2), (0.3, 0.9)]) == pytest.approx(0.37)
    assert hypervolume([(0.8, 0.2), (0.3, 0.9), (0.2, 0.1)]) == pytest.approx(0.37)  # dominated
    assert hypervolume([(0.0, 0.9), (0.8, 0.0)]) == 0.0 and hypervolume([]) == 0.0


def test_rerun_uses_the_cache(micro):
    from bench.quality.pipeline import train_or_load

    tmp, _, _, _ = micro
    lines = []
    art = train_or_load(preset("micro"), root=tmp / "cache", log=lines.append)
    stages = [x for x in lines if not x.startswith(("[quality] validation", "[quality] recipe"))]
    # (the chosen runs are looked up again after the choice: their lines repeat)
    assert len(set(stages)) == 11 and all(": cached (" in x for x in stages)
    assert art.prm == tmp / "cache" / "prm" / "prm" and art.summaries["sft"]["kept_step"] >= 2


def test_logit_ensemble_follows_the_mixed_logits():
    """Greedy: weight 1 is policy A's own greedy answer (the engine's), and every token of a
    0.5 mix is the argmax of the two models' averaged logits after the same prefix."""
    from bench.quality.ensemble import LogitEnsemble
    from mahalo_engine import Engine, load_policy
    from mahalo_engine.text import encode_prompt
    from mahalo_engine.tiny import tiny_checkpoint

    a, b = load_policy(tiny_checkpoint("qwen2", seed=1)), load_policy(tiny_checkpoint("qwen2", seed=2))
    ens = LogitEnsemble(a, b)
    prompts = ["Ana has 3 apples.", "Q:"]
    kw = dict(max_new_tokens=6, temperature=0.0, top_k=0, seed=0)
    engine = Engine(a, max_batch=2, max_seq_len=64, cuda_graphs=False)
    assert [ids for _, ids in ens.generate(prompts, 1.0, **kw)] == \
        [g.token_ids for g in engine.generate(prompts, **kw)]
    for prompt, (_, ids) in zip(prompts, ens.generate(prompts, 0.5, **kw)):
        seq = encode_prompt(a.tokenizer, prompt)
        for t in ids:
            x = torch.tensor([seq])
            mixed = 0.5 * a.logits(x)[0, -1] + 0.5 * b.logits(x)[0, -1]
            assert t == int(mixed.argmax())
            seq.append(t)
