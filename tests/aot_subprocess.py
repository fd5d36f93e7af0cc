"""Ahead-of-time Triton compiles for sm_90 run in a fresh interpreter: Triton picks its backend at
import, so they cannot share the test process, which runs the kernels in interpreter mode
(``TRITON_INTERPRET=1``). A test module defines ``compile_all()`` and prints its JSON under
``__main__``; its fixture calls `compile_in_subprocess(__file__)`."""
import json
import os
import subprocess
import sys


def compile_in_subprocess(module_file: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    root = os.path.dirname(os.path.dirname(os.path.abspath(module_file)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, module_file], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
