"""End-to-end micro run of the quality bench on the long task (`preset("long-micro")`): the task
module reaches every stage (SFT data, pairs, rollouts), the SFT starts from the short task's SFT
policy, only the MAH-DPO run is trained (no baselines), and the PRM-quality stats equal a recount
from the files the stage leaves."""
import json

import pytest
import torch

from bench.quality.settings import preset


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from bench.quality import answers
    from bench.quality.pipeline import train_or_load
    from bench.quality.prm_quality import calibration_png, prm_quality

    tmp = tmp_path_factory.mktemp("quality-long")
    cfg = preset("long-micro")
    lines = []
    answers.reset_cross_check()
    # The engine's CPU path (reference sampling), as the bench runs it (see test_quality_pipeline).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        art = train_or_load(cfg, root=tmp / cfg.train_key(), log=lines.append)
        stats = prm_quality(art, cfg, log=lines.append)
    calibration_png(stats, tmp / "calibration.png")
    return tmp, cfg, art, stats, lines, answers.cross_check()


def test_stages_use_the_long_task(micro):
    from mahalo_engine import load_policy, load_prm

    tmp, cfg, art, _, lines, tally = micro
    root = art.root
    sft_rows = [json.loads(x) for x in (root / "sft" / "sft.jsonl").read_text().splitlines()]
    worked = [r["completion"] for r in sft_rows if "=" in r["completion"]]
    assert worked and all(5 <= len(c.split("\n\n")) <= 8 for c in worked)
    assert all(" Then " in r["prompt"] and ", " in r["prompt"] for r in sft_rows)
    # initialised from the short task's micro SFT policy, trained into its own directory
    init = tmp / preset("micro").train_key() / "sft" / "policy"
    assert init.is_dir() and load_policy(init).num_heads == 1
    assert any(line.startswith("[quality] sft: ") and "initial policy: preset 'micro'" in line
               for line in lines)
    assert not (root / "runs" / "dpo-acc-lr2e-05").exists() and not (root / "soups").exists()
    assert art.dpo_acc is None and art.soups == {}
    mah = load_policy(art.mah_dpo)
    assert mah.objectives == ["acc", "style"]
    assert not torch.equal(mah.heads[0], load_policy(art.sft).heads[0])
    assert load_prm(art.prm).objectives == ["acc", "style"]
    assert tally["checked"] > 0  # every verdict went through math-verify with the cross-check


def test_prm_quality_equals_a_recount(micro):
    from bench.quality.prm_quality import auc, calibration, prefix_examples

    tmp, cfg, art, stats, _, _ = micro
    d = art.root / "prm_quality"
    rows = [json.loads(x) for x in (d / "rollouts.jsonl").read_text().splitlines()]
    values = [json.loads(x) for x in (d / "values.jsonl").read_text().splitlines()]
    prefixes, finals = prefix_examples(rows, cfg.mc_rollouts)
    assert stats["problems"] == cfg.n_prmq and stats["finals"] == len(finals) == cfg.n_prmq
    assert stats["prefixes"] == len(prefixes) == len(values)
    assert stats["examples"] == len(prefixes) * cfg.mc_rollouts
    labels = [y for v in values for y in v["labels"]]
    scores = [v["value"] for v in values for _ in v["labels"]]
    both = 0 < sum(labels) < len(labels)
    assert stats["auc"] == (auc(scores, labels) if both else None)
    cal = calibration([v["value"] for v in values],
                      [sum(v["labels"]) / len(v["labels"]) for v in values])
    assert stats["calibration"]["bins"] == cal["bins"]
    assert sum(b["count"] for b in cal["bins"]) == len(prefixes)
    assert stats["prm_labelled_steps"] == art.summaries["prm"]["labelled_steps"] > 0
    # the reference checker, recounted: a prefix is right when it equals the reference's first steps
    from bench.quality.pipeline import prompt_of, splits

    ref = {prompt_of(p): p.solution("worked").split("\n\n") for p in splits(cfg)["prmq"]}
    right = [[s.strip() for s in v["steps"]] == [s.strip() for s in ref[v["prompt"]][:len(v["steps"])]]
             for v in values]
    assert stats["right_prefixes"] == sum(right) and stats["wrong_prefixes"] == len(right) - sum(right)
    assert stats["answer_check"]["checked"] == len(rows)
    png = tmp / "calibration.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000


def test_quality_tables_refuse_a_run_without_baselines(micro):
    from bench.quality.evaluate import Evaluator

    _, cfg, art, _, _, _ = micro
    with pytest.raises(ValueError, match="trained with baselines=False"):
        Evaluator(art, cfg, max_batch=2)


def test_prm_quality_needs_held_out_problems(micro):
    import dataclasses

    from bench.quality.prm_quality import prm_quality

    _, cfg, art, _, _, _ = micro
    with pytest.raises(ValueError, match="n_prmq is 0"):
        prm_quality(art, dataclasses.replace(cfg, n_prmq=0))


def test_prm_quality_reads_given_rollouts(micro, tmp_path):
    """``rollouts=``: another stage's rows instead of sampling again give the same stats (the PRM
    scored on the very same examples); a file of other problems is refused."""
    import dataclasses

    from bench.quality.prm_quality import prm_quality

    _, cfg, art, stats, _, _ = micro
    given = art.root / "prm_quality" / "rollouts.jsonl"
    again = prm_quality(dataclasses.replace(art, root=tmp_path / "again"), cfg, rollouts=given,
                        log=lambda line: None)
    assert (tmp_path / "again" / "prm_quality" / "rollouts.jsonl").read_text() == given.read_text()
    assert again["rollouts_from"] == str(given) and stats["rollouts_from"] == "sampled"
    skip = ("artefact", "rollouts_from", "seconds")
    assert {k: v for k, v in again.items() if k not in skip} == {
        k: v for k, v in stats.items() if k not in skip}
    other = tmp_path / "other.jsonl"
    rows = [json.loads(x) for x in given.read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "prompt": "Question: elsewhere"}) + "\n" for r in rows))
    with pytest.raises(ValueError, match="not this config's 3 held-out prmq problems"):
        prm_quality(dataclasses.replace(art, root=tmp_path / "other"), cfg, rollouts=other)
