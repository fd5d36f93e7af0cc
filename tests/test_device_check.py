"""bench/device_check.sh must fit one device call: its dry run lists the stages in order of value
with budgets summing to <= 540 s (a call is cut at 600 s), runs no bare `python`, and interrupts a
stage with SIGINT (so pytest and the bench still report) before killing it."""
import os
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_check.sh"
ORDER = ["env", "build", "graphs", "fullsize", "kernels", "bench1", "bench2"]


def _dry_run(**env):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3", **env})
    assert proc.returncode == 0, proc.stderr
    rows = [re.match(r"(\w+)\s+(\d+)s\s+(.*)", line) for line in proc.stdout.splitlines()]
    return [m.groups() for m in rows if m], proc.stdout


def test_stages_in_order_within_one_call():
    stages, out = _dry_run()
    assert [s[0] for s in stages] == ORDER
    total = sum(int(s[1]) for s in stages)
    assert total <= 540
    assert f"total budget: {total}s" in out


def test_stage_commands():
    stages = {name: cmd for name, _, cmd in _dry_run()[0]}
    for name, cmd in stages.items():
        assert not re.search(r"(^|[\s;&|])python\s", cmd), f"{name} runs a bare python: {cmd}"
    assert "pip install -v" in stages["build"] and "device_report extension" in stages["build"]
    assert " -x" not in stages["graphs"] and "--junitxml" in stages["graphs"]
    assert "tests/test_triton_*.py" in stages["kernels"]  # every kernel test file, named after its op
    for aot in ("multihead", "cascade"):  # ignored: AOT compiles, CI runs them
        assert f"--ignore=tests/test_triton_{aot}_compile.py" in stages["kernels"]
    assert "--append" in stages["bench2"] and "--append" not in stages["bench1"]


def test_subset_budget():
    stages, out = _dry_run(STAGES="bench1,bench2")
    assert [s[0] for s in stages] == ["bench1", "bench2"]
    assert "total budget: 120s" in out


def test_interrupts_before_killing():
    assert 'timeout -s INT -k 10 "$budget"' in SCRIPT.read_text()


def test_a_failed_build_stops_the_run(tmp_path):
    # An interpreter whose pip fails: the graphs stage must not run (it would only fail at import).
    fake = tmp_path / "python3"
    fake.write_text('#!/usr/bin/env bash\nif [[ "$*" == *"-m pip"* ]]; then echo "nvcc fatal: boom";'
                    ' exit 1; fi\necho "ran: $*" >> "$OUT/ran.txt"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), "OUT": str(out),
                               "STAGES": "build,graphs"})
    assert proc.returncode == 1
    assert "BUILD FAILED (rc=1)" in proc.stdout and "nvcc fatal: boom" in proc.stdout
    assert "build rc=1" in proc.stdout and "graphs rc=" not in proc.stdout
    ran = (out / "ran.txt").read_text() if (out / "ran.txt").exists() else ""
    assert "pytest" not in ran
