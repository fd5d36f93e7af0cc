"""Ahead-of-time Triton compiles for sm_90 run in a fresh interpreter: Triton picks its backend at
import, so they cannot share the test process, which runs the kernels in interpreter mode
(``TRITON_INTERPRET=1``). A test module defines ``compile_all()`` and prints its JSON under
``__main__``, and gets its fixture from `compiled_fixture(__file__)`.

Each compile runs once per Triton: the installed one, and Triton 3.6 — the GPU machine's version,
whose ptxas spills where newer ones do not — which ``scripts/install.sh --tests`` unpacks into
``.triton36/`` (put first on the subprocess's path; torch is shared)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON36 = os.path.join(ROOT, ".triton36")
TRITONS = ("installed", "3.6")  # test ids: which Triton compiled the kernels


def compile_in_subprocess(module_file: str, triton: str = "installed") -> dict:
    """``compile_all()`` of ``module_file`` under ``triton`` (one of ``TRITONS``); skips the test
    when Triton 3.6 is not unpacked (``scripts/install.sh --tests`` does it)."""
    if triton not in TRITONS:
        raise ValueError(f"triton={triton!r}: expected one of {TRITONS}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    paths = [ROOT]
    if triton == "3.6":
        if not os.path.isdir(os.path.join(TRITON36, "triton")):
            pytest.skip(f"Triton 3.6 not found in {TRITON36} (bash scripts/install.sh --tests unpacks it)")
        paths.insert(0, TRITON36)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, module_file], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if triton == "3.6":
        assert result["triton"].startswith("3.6"), f"expected Triton 3.6, ran {result['triton']}"
    return result


def compiled_fixture(module_file: str):
    """The ``compiled`` fixture of a compile-test module: its ``compile_all()`` results, one
    subprocess per Triton of ``TRITONS`` (a test id each), shared by the module's tests."""
    results: dict = {}

    @pytest.fixture(params=TRITONS, ids=[f"triton-{t}" for t in TRITONS])
    def compiled(request):
        if request.param not in results:
            results[request.param] = compile_in_subprocess(module_file, request.param)
        return results[request.param]

    return compiled
