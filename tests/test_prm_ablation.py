"""The PRM ablation's bookkeeping (`bench.quality.prm_ablation`): the decision rule, the variant
configs (one PRM field changed, a new cache key), the stage copy that leaves the preset's cache
alone, the paired AUC difference against a hand count, and the CLI's one-line errors."""
import dataclasses
import json
import random

import pytest

from bench.quality import prm_ablation as ab
from bench.quality.settings import preset


def _pair_auc(scores, labels):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_recommend_needs_more_than_the_margin():
    assert ab.MARGIN == 0.05
    assert ab.recommend(0.50, {}) == "preset"
    assert ab.recommend(0.50, {"a": 0.54, "b": 0.53}) == "preset"  # best gains only 0.04
    assert ab.recommend(0.50, {"a": 0.5 + 0.05, "b": 0.40}) == "preset"  # exactly the margin
    assert ab.recommend(0.50, {"a": 0.56, "b": 0.60}) == "b"  # the highest, not the first
    assert ab.recommend(0.50, {"a": 0.56, "b": 0.45}) == "a"
    assert ab.recommend(0.50, {"a": 0.58}, margin=0.1) == "preset"


def test_variants_change_one_prm_setting_and_the_key():
    base = preset("long")
    keys = {base.train_key()}
    for name, changes in ab.VARIANTS.items():
        cfg = ab.variant_config(name)
        diff = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(base, f.name)}
        assert diff == set(changes) and len(diff) == 1 and next(iter(diff)).startswith("prm_")
        keys.add(cfg.train_key())
    assert len(keys) == 1 + len(ab.VARIANTS)  # every variant has its own cache directory
    assert ab.variant_config(ab.CONTROL) == base
    assert ab.variant_root(ab.CONTROL).name == base.train_key() + "-rerun"
    with pytest.raises(ValueError, match="variant must be one of"):
        ab.variant_config("steps9000")


def _fake_cache(root):
    for s in ("sft", "pairs", "rollouts", "prm"):
        (root / s).mkdir(parents=True)
        (root / s / "stage.json").write_text(json.dumps({"stage": s}))
    (root / "runs" / "mah-x").mkdir(parents=True)
    (root / "runs" / "mah-x" / "stage.json").write_text("{}")
    (root / "ref_logps").mkdir()
    (root / "ref_logps" / "ref-logps-abc").write_text("cache")


def test_seed_cache_copies_shared_stages_and_leaves_the_source(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_cache(src)
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    assert ab.seed_cache(src, dst) == list(ab.SHARED_STAGES)
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == before  # copied, not moved
    assert not (dst / "prm").exists()  # the PRM is what the variant retrains
    assert (dst / "runs" / "mah-x" / "stage.json").is_file()
    assert (dst / "ref_logps" / "ref-logps-abc").read_text() == "cache"
    (dst / "sft" / "stage.json").write_text("kept")
    assert ab.seed_cache(src, dst) == []  # already there: left alone
    assert (dst / "sft" / "stage.json").read_text() == "kept"
    (src / "rollouts" / "stage.json").unlink()  # an unfinished stage is not copied
    with pytest.raises(ValueError, match="stage 'rollouts' is not cached"):
        ab.seed_cache(src, tmp_path / "dst2")


def _values(rng, problems=12):
    rows = []
    for p in range(problems):
        for k in range(1, rng.randint(2, 5)):
            rows.append({"prompt": f"q{p}", "steps": [f"s{i}" for i in range(k)],
                         "labels": [rng.random() < 0.6 for _ in range(4)], "value": rng.random()})
    return rows


def test_paired_auc_difference_against_a_pair_count():
    rng = random.Random(3)
    base = _values(rng)
    other = [{**r, "value": sum(r["labels"]) / 4 + 0.1 * rng.random()} for r in base]
    labels = [y for r in base for y in r["labels"]]

    def expand(rows):
        return [r["value"] for r in rows for _ in r["labels"]]

    out = ab.paired_auc_difference(base, other, resamples=300)
    want = _pair_auc(expand(other), labels) - _pair_auc(expand(base), labels)
    assert out["difference"] == pytest.approx(want)
    assert out["problems"] == 12 and out["resamples"] == 300
    assert out["ci95_lo"] <= want <= out["ci95_hi"]
    same = ab.paired_auc_difference(base, base, resamples=50)
    assert same["difference"] == same["ci95_lo"] == same["ci95_hi"] == 0.0
    with pytest.raises(ValueError, match="not paired"):
        ab.paired_auc_difference(base, base[1:])


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAHALO_CACHE", str(tmp_path))
    for argv in (["--variant", "nope", "--out", str(tmp_path / "x.json")],
                 ["--summary", "steps600", "--out", str(tmp_path / "x.json")]):
        with pytest.raises(SystemExit) as e:
            ab.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "Traceback" not in err and ("variants must be among" in err
                                           or "no measured prm_quality stage" in err)
    assert not (tmp_path / "x.json").exists()
