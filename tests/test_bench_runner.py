"""`python -m bench`'s runner: the JSON is rewritten after every section, so a run cut short (a
device call's time limit, a failing section) keeps what it finished."""
import json
import sys
import types

import pytest

import bench.__main__ as runner


def _section(name, rows=None, error=None):
    module = types.ModuleType(f"bench.{name}")

    def run(ctx):
        if error is not None:
            raise error
        return rows

    module.run = run
    return module


@pytest.fixture
def sections(monkeypatch, tmp_path):
    fake = {"alpha": _section("alpha", [{"x": 1, "ratio": 2.5}]),
            "boom": _section("boom", error=RuntimeError("kernel fault at row 3")),
            "omega": _section("omega", [{"y": "z"}])}
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, f"bench.{name}", module)
    monkeypatch.setattr(runner, "SECTIONS", {n: n for n in fake})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # the runner checks --model is a model directory
    return model


def test_json_holds_each_finished_section_when_a_later_one_fails(sections, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="kernel fault"):
        runner.main(["--device", "cpu", "--model", str(sections), "--sections", "alpha,boom,omega",
                     "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["alpha"]
    assert report["sections"]["alpha"]["rows"] == [{"x": 1, "ratio": 2.5}]
    assert report["sections"]["alpha"]["seconds"] >= 0
    assert not out.with_name(out.name + ".tmp").exists()


def test_keep_going_records_the_error_and_runs_the_rest(sections, tmp_path):
    out = tmp_path / "r.json"
    rc = runner.main(["--device", "cpu", "--model", str(sections), "--sections", "alpha,boom,omega",
                      "--out", str(out), "--keep-going"])
    assert rc == 1
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["alpha", "boom", "omega"]
    assert report["sections"]["boom"]["error"] == "RuntimeError: kernel fault at row 3"
    assert report["sections"]["omega"]["rows"] == [{"y": "z"}]


def test_append_keeps_the_sections_of_an_earlier_call(sections, tmp_path):
    out = tmp_path / "r.json"
    common = ["--device", "cpu", "--model", str(sections), "--out", str(out)]
    assert runner.main(common + ["--sections", "alpha"]) == 0
    assert runner.main(common + ["--sections", "omega", "--append"]) == 0
    assert list(json.loads(out.read_text())["sections"]) == ["alpha", "omega"]
    assert runner.main(common + ["--sections", "omega"]) == 0  # without --append: replaced
    assert list(json.loads(out.read_text())["sections"]) == ["omega"]
