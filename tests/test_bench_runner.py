"""`python -m bench`'s runner: the JSON is rewritten after every section and after every row a
generator section yields, so a run cut short (a device call's time limit sending SIGINT, a
section's --budget, a failing section) keeps what it measured."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import bench.__main__ as runner


def _section(name, rows=None, error=None, run=None):
    module = types.ModuleType(f"bench.{name}")

    def returns_rows(ctx):
        if error is not None:
            raise error
        return rows

    module.run = run or returns_rows
    return module


def _yields(n, *, then=None, sleep=0.0, closed=None):
    """A generator section: n rows (``sleep`` s each), then raises ``then``; records in ``closed``
    whether it was stopped early (its finally block ran before the end)."""
    def run(ctx):
        done = False
        try:
            for i in range(n):
                time.sleep(sleep)
                yield {"row": i}
            done = True
            if then is not None:
                raise then
        finally:
            if closed is not None:
                closed.append(not done)
    return run


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
    assert list(report["sections"]) == ["alpha", "boom"]  # omega never ran
    assert report["sections"]["alpha"]["rows"] == [{"x": 1, "ratio": 2.5}]
    assert report["sections"]["boom"]["error"] == "RuntimeError: kernel fault at row 3"
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


def _add_section(monkeypatch, name, run):
    monkeypatch.setitem(sys.modules, f"bench.{name}", _section(name, run=run))
    monkeypatch.setitem(runner.SECTIONS, name, name)


def test_an_on_request_section_runs_only_when_named(sections, monkeypatch, tmp_path):
    # `scaling` trains and measures for minutes: the default list (no --sections) leaves it out.
    assert "scaling" in runner.ON_REQUEST
    _add_section(monkeypatch, "lazy", lambda ctx: [{"lazy": 1}])
    monkeypatch.setattr(runner, "ON_REQUEST", ("lazy",))
    monkeypatch.setitem(sys.modules, "bench.boom", _section("boom", [{"x": 0}]))
    out = tmp_path / "r.json"
    assert runner.main(["--device", "cpu", "--model", str(sections), "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["sections"]) == ["alpha", "boom", "omega"]
    assert runner.main(["--device", "cpu", "--model", str(sections), "--out", str(out),
                        "--sections", "lazy"]) == 0
    assert json.loads(out.read_text())["sections"]["lazy"]["rows"] == [{"lazy": 1}]


def test_an_interrupted_section_keeps_the_rows_it_yielded(sections, monkeypatch, tmp_path):
    # KeyboardInterrupt is what SIGINT (timeout -s INT in bench/device_check.sh) raises.
    _add_section(monkeypatch, "slow", _yields(2, then=KeyboardInterrupt()))
    out = tmp_path / "r.json"
    rc = runner.main(["--device", "cpu", "--model", str(sections), "--sections", "alpha,slow,omega",
                      "--out", str(out)])
    assert rc == 130
    report = json.loads(out.read_text())
    assert list(report["sections"]) == ["alpha", "slow"]
    assert report["sections"]["slow"]["rows"] == [{"row": 0}, {"row": 1}]
    assert report["sections"]["slow"]["interrupted"] is True


def test_a_failing_generator_section_keeps_its_rows_and_error(sections, monkeypatch, tmp_path):
    _add_section(monkeypatch, "flaky", _yields(3, then=RuntimeError("illegal address")))
    out = tmp_path / "r.json"
    rc = runner.main(["--device", "cpu", "--model", str(sections), "--sections", "flaky,omega",
                      "--out", str(out), "--keep-going"])
    assert rc == 1
    flaky = json.loads(out.read_text())["sections"]["flaky"]
    assert flaky["rows"] == [{"row": i} for i in range(3)]
    assert flaky["error"] == "RuntimeError: illegal address"


def test_budget_stops_a_section_between_rows_and_runs_the_next(sections, monkeypatch, tmp_path):
    closed = []
    _add_section(monkeypatch, "long", _yields(6, sleep=0.4, closed=closed))
    out = tmp_path / "r.json"
    rc = runner.main(["--device", "cpu", "--model", str(sections), "--sections", "long,omega",
                      "--out", str(out), "--budget", "long=0.5"])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["sections"]["long"]["rows"]
    assert 1 <= len(rows) < 6 and rows == [{"row": i} for i in range(len(rows))]
    assert report["sections"]["long"]["cut"] == "budget 0.5 s"
    assert closed == [True]  # the section was closed (its cleanup ran), not left suspended
    assert report["sections"]["omega"]["rows"] == [{"y": "z"}]


@pytest.mark.parametrize("spec", ["0", "decode=-3", "nosuch=5", "decode=abc"])
def test_bad_budget_is_one_line_and_exit_2(sections, spec, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--device", "cpu", "--model", str(sections), "--budget", spec])
    assert e.value.code == 2
    assert f"{spec!r}: expected SECONDS > 0" in capsys.readouterr().err


_DRIVER = """
import sys, time, types
from pathlib import Path
import bench.__main__ as runner

def run(ctx):
    for i in range(100):
        yield {"row": i}
        if i == 2:
            Path(sys.argv[2]).write_text("3 rows")
        time.sleep(0.2)

module = types.ModuleType("bench.ticking")
module.run = run
sys.modules["bench.ticking"] = module
runner.SECTIONS["ticking"] = "rows until interrupted"
sys.exit(runner.main(["--device", "cpu", "--model", sys.argv[3], "--sections", "ticking",
                      "--out", sys.argv[1]]))
"""


def _inherit_sigint_ignored_and_blocked() -> None:
    """What a shell's background job (ignored) or a child of a thread that blocks it inherits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@pytest.mark.parametrize("inherited", ["default", "ignored_and_blocked"])
def test_sigint_mid_section_keeps_its_rows(sections, tmp_path, inherited):
    """The device check's cut, for real: SIGINT to a running bench process, also one that
    inherited SIGINT ignored and blocked."""
    out, ready = tmp_path / "r.json", tmp_path / "ready"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    # Explicit either way: a test worker's own disposition is not this test's to assume.
    setup = (_inherit_sigint_ignored_and_blocked if inherited != "default"
             else lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc = subprocess.Popen([sys.executable, str(driver), str(out), str(ready), str(sections)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=setup)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert ("SIGINT was ignored" in err) == (inherited != "default")
    section = json.loads(out.read_text())["sections"]["ticking"]
    assert section["interrupted"] is True
    assert 3 <= len(section["rows"]) < 100
    assert section["rows"] == [{"row": i} for i in range(len(section["rows"]))]
