"""bench/device_check.sh must fit one device call and run what matters first: its dry run lists the
stages in order of value with budgets plus kill grace summing to <= 570 s (a call is cut at
600 s), runs no bare `python`, interrupts a stage with SIGINT (so pytest and the bench still
report) before killing it, and leaves at most 8 files in $OUT. What each pytest command runs is
checked by collecting it (`pytest --collect-only` on the dry run's own arguments), not by looking
for flags: pytest ignores an --ignore for a file named on the command line, and collects files
named before a directory in directory order."""
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
BUILD = ROOT / "bench" / "device_build.sh"
ORDER = ["env", "build", "graphs", "fullsize", "kernels", "bench1", "bench2"]
GRACE = 5
GRAPH_FILES = ["tests/test_engine_graphs.py", "tests/test_engine.py"]
# The Triton kernel tests that run on the card, by file name: every tests/test_triton_<op>_*.py but
# the sm_90 AOT compile tests (CI's) and the CPU paths.
KERNEL_FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_triton_*.py")
                      if not p.stem.endswith(("_compile", "_cpu")))


def _dry_run(**env):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3", **env})
    assert proc.returncode == 0, proc.stderr
    rows = [re.match(r"(\w+)\s+(\d+)s\s+(.*)", line) for line in proc.stdout.splitlines()]
    return [m.groups() for m in rows if m], proc.stdout


def _pytest_args(cmd: str) -> list[list[str]]:
    """The arguments of each `python3 -m pytest` in a stage command (output options dropped)."""
    runs = []
    for part in re.split(r";|&&|\|\|", cmd):
        words = shlex.split(part)
        if "pytest" not in words:
            continue
        words = words[words.index("pytest") + 1:]
        if ">>" in words:
            words = words[:words.index(">>")]
        runs.append([w for w in words if not w.startswith(("--junitxml", "--durations", "-rA"))])
    return runs


_COLLECT = """
import json, sys
import pytest

class Items:
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

found = {}
for key, args in json.loads(sys.argv[1]).items():
    items = Items()
    rc = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *args], plugins=[items])
    assert rc == 0, (key, rc)
    found[key] = items.ids
open(sys.argv[2], "w").write(json.dumps(found))
"""


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Node ids each dry-run pytest command selects, and the independent references; one
    subprocess (test modules import once) without TRITON_INTERPRET, as on the card."""
    stages = {name: cmd for name, _, cmd in _dry_run()[0]}
    graphs, kernels = _pytest_args(stages["graphs"]), _pytest_args(stages["kernels"])
    assert len(graphs) == 2 and len(kernels) == 1, (graphs, kernels)
    runs = {"graphs-first": graphs[0], "graphs-rest": graphs[1], "kernels": kernels[0],
            "all-gpu": ["-m", "gpu", "tests"], "all-kernels": ["-m", "not gpu", *KERNEL_FILES]}
    out = tmp_path_factory.mktemp("collect") / "ids.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COLLECT, json.dumps(runs), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _files(ids):
    return list(dict.fromkeys(i.split("::")[0] for i in ids))


def test_stages_in_order_within_one_call():
    stages, out = _dry_run()
    assert [s[0] for s in stages] == ORDER
    total = sum(int(s[1]) + GRACE for s in stages)
    assert total <= 570
    assert f"total budget: {total}s with {GRACE}s kill grace" in out


def test_stage_commands():
    stages = {name: cmd for name, _, cmd in _dry_run()[0]}
    for name, cmd in stages.items():
        assert not re.search(r"(^|[\s;&|])python\s", cmd), f"{name} runs a bare python: {cmd}"
    assert "bench/device_build.sh" in stages["build"]
    assert " -x" not in stages["graphs"] and "--junitxml" in stages["graphs"]
    assert "--append" in stages["bench2"] and "--append" not in stages["bench1"]
    for name in ("bench1", "bench2"):
        assert "--quick" in stages[name] and "--budget" in stages[name]


def test_graph_tests_run_first_as_their_own_command(collected):
    first = collected["graphs-first"]
    assert first and _files(first) == GRAPH_FILES
    assert set(first) == {i for i in collected["all-gpu"] if i.split("::")[0] in GRAPH_FILES}


def test_graph_stage_runs_every_gpu_test_once(collected):
    first, rest = collected["graphs-first"], collected["graphs-rest"]
    assert not set(first) & set(rest)
    assert sorted(first + rest) == sorted(collected["all-gpu"]), \
        "a GPU-marked test file is missing from GPU_TESTS in bench/device_check.sh"
    # The csrc CUDA kernels just built come first.
    assert _files(rest)[0] == "tests/test_kv_ops.py"


def test_kernel_stage_runs_the_kernel_tests_most_valuable_first(collected):
    ids = collected["kernels"]
    assert _files(ids)[:3] == ["tests/test_triton_multihead.py",
                               "tests/test_triton_cascade_decode.py",
                               "tests/test_triton_cascade_extend.py"]
    assert sorted(ids) == sorted(collected["all-kernels"])
    assert not any("compile" in f for f in _files(ids))  # AOT compiles are CI's


def test_out_holds_at_most_8_files():
    stages, _ = _dry_run()
    named = {m for _, _, cmd in stages for m in re.findall(r"/tmp/mahalo-device-out/([\w.]+)", cmd)}
    assert len(named) + 1 <= 8, named  # + bench.json.tmp if a write is killed mid-way


def test_subset_budget():
    stages, out = _dry_run(STAGES="bench1,bench2")
    assert [s[0] for s in stages] == ["bench1", "bench2"]
    assert f"total budget: {sum(int(s[1]) + GRACE for s in stages)}s" in out


def test_interrupts_before_killing():
    text = SCRIPT.read_text()
    assert f"GRACE={GRACE}" in text
    assert 'timeout -s INT -k "$GRACE" "$budget"' in text


def _fake_python(tmp_path, body: str) -> Path:
    """An interpreter stand-in: ``body`` (bash) sees the arguments; every call is logged."""
    fake = tmp_path / "python3"
    fake.write_text('#!/usr/bin/env bash\necho "ran: $*" >> "$LOG"\n' + textwrap.dedent(body))
    fake.chmod(0o755)
    return fake


def _run(script, fake, tmp_path, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), "OUT": str(out),
                               "LOG": str(tmp_path / "ran.txt"), **env})
    ran = (tmp_path / "ran.txt").read_text() if (tmp_path / "ran.txt").exists() else ""
    return proc, out, ran


def test_a_failed_build_stops_the_run(tmp_path):
    # pip fails on a compiler error: no in-place retry, and the graphs stage must not run (it
    # would only fail at import).
    fake = _fake_python(tmp_path, 'if [[ "$*" == *"-m pip"* ]]; then echo "nvcc fatal: boom"; '
                                  'exit 1; fi\n')
    proc, _, ran = _run(SCRIPT, fake, tmp_path, STAGES="build,graphs")
    assert proc.returncode == 1
    assert "BUILD FAILED (rc=1)" in proc.stdout and "nvcc fatal: boom" in proc.stdout
    assert "build rc=1" in proc.stdout and "graphs rc=" not in proc.stdout
    assert "-m pytest" not in ran and "setup.py" not in ran


def test_build_falls_back_in_place_on_a_read_only_site_packages(tmp_path):
    fake = _fake_python(tmp_path, '''
        if [[ "$*" == *"-m pip"* ]]; then
          echo "OSError: [Errno 30] Read-only file system: '/usr/lib/python3/site-packages/x.pth'"
          exit 1
        fi
        ''')
    proc, _, ran = _run(BUILD, fake, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ran: setup.py build_ext --inplace" in ran
    assert "ran: -m bench.device_report extension" in ran
    assert "build: ran the in-place build (setup.py build_ext --inplace)" in proc.stdout


def test_build_says_the_editable_install_ran(tmp_path):
    proc, _, ran = _run(BUILD, _fake_python(tmp_path, ""), tmp_path)
    assert proc.returncode == 0
    assert "build: ran the editable install (pip install -e .)" in proc.stdout
    assert "setup.py" not in ran


def test_files_left_by_a_killed_write_are_removed(tmp_path):
    # A bench killed between a temporary file and its rename, and before releasing its lock.
    left = ["bench.json.tmp", ".bench.json.k2x9q1", "bench.json.lock"]
    fake = _fake_python(tmp_path, 'if [[ "$*" == *"-m bench "* ]]; then echo "{}" > "$OUT/bench.json"; '
                                  + "".join(f'echo "{{" > "$OUT/{name}"; ' for name in left) + 'fi\n')
    proc, out, _ = _run(SCRIPT, fake, tmp_path, STAGES="bench1")
    assert proc.stdout.count("removing") == 3
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.log", "tests.log"]
