"""Side-effect-free imports: importing ``mahalo_engine``, its public names, the training CLIs or
their ``--help`` loads no C++ extension (``mahalo_engine._C``); the first use of a KV op does, also
when that first use is a ``torch.compile(fullgraph=True)`` trace. Each scenario runs in a fresh
interpreter (this process has long since loaded everything)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIS = ["mahalo_engine", "training.sft", "training.mah_dpo", "training.prm", "training.labels",
        "training.convert", "training.data", "training.checkpoint"]

_IMPORTS = r"""
import contextlib, io, json, runpy, sys
loaded = lambda: "mahalo_engine._C" in sys.modules
facts = {}
import mahalo_engine
facts["modules_after_import"] = sorted(m for m in sys.modules
                                       if m.split(".")[0] in ("mahalo_engine", "triton_kernels"))
import training.mah_dpo, training.prm, training.labels
facts["C_after_training_import"] = loaded()
helps = {}
for cli in CLIS:
    out, sys.argv = io.StringIO(), [cli, "--help"]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(cli, run_name="__main__", alter_sys=True)
        code = None
    except SystemExit as e:
        code = e.code
    helps[cli] = [code, out.getvalue()]
facts["helps"] = helps
facts["C_after_helps"] = loaded()
from mahalo_engine import *
from mahalo_engine import __all__ as public
import mahalo_engine.ops, mahalo_engine.paged
facts["missing_names"] = [n for n in public if n not in globals()]
facts["dir_lacks"] = sorted(set(public) - set(dir(mahalo_engine)))
try:
    mahalo_engine.NoSuchName
    facts["unknown_name"] = "no error"
except AttributeError as e:
    facts["unknown_name"] = str(e)
facts["C_after_public_names"] = loaded()
import torch
cache = torch.arange(2 * 2 * 4 * 1 * 6 * 2, dtype=torch.float32).view(2, 2, 4, 1, 6, 2)
want = cache.clone()
want[:, :, 3, :, 1:5] = cache[:, :, 0, :, 1:5]
i = lambda *v: torch.tensor(v, dtype=torch.int32)
mahalo_engine.ops.kv_copy_ranges(cache, i(0), i(3), i(1), i(5))
facts["C_after_op"] = loaded()
facts["op_result_ok"] = torch.equal(cache, want)
facts["csrc_ops"] = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mahalo::"))
facts["ops_without_fake"] = [n for n in facts["csrc_ops"]
                             if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "Meta")]
print(json.dumps(facts))
"""

# Nothing calls an op eagerly before the compiled functions run: the first trace itself must load
# the extension and find the ops and their fake impls (a graph break would raise: fullgraph=True).
_COMPILE_FIRST = r"""
import json, sys, torch
from mahalo_engine import ops, paged
from mahalo_engine.paged import PagedKVCache
facts = {"C_before": "mahalo_engine._C" in sys.modules}

def dense():
    cache = torch.randn(2, 2, 5, 1, 8, 3)
    lens = torch.tensor([6, 3, 0, 0, 0], dtype=torch.int32)
    want = cache.clone()
    want[:, :, 2, :, :6] = cache[:, :, 0, :, :6]
    want[:, :, 4, :, :3] = cache[:, :, 1, :, :3]
    torch.compile(ops.kv_fork, backend=BACKEND, fullgraph=True)(
        cache, lens, torch.tensor([0, 1]), torch.tensor([2, 4]))
    facts["dense_ok"] = torch.equal(cache, want) and lens.tolist() == [6, 3, 6, 0, 3]

def paged_():
    pc = PagedKVCache.allocate(num_layers=2, num_blocks=12, block_size=4, num_kv_heads=1,
                               head_dim=3, num_seqs=3, max_blocks_per_seq=4)
    kv = torch.randn(2, 2, 7, 1, 3)
    pc.append(0, kv)  # host bookkeeping only: no op
    fork = torch.compile(paged.kv_fork, backend=BACKEND, fullgraph=True)
    fork(pc, torch.tensor([0, 0], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32))
    pc.check()
    facts["paged_ok"] = all(torch.equal(pc.gather(s), kv) for s in (0, 1, 2))
    facts["shared_full_block"] = int(pc.refcounts[pc.block_tables[0, 0]])

first, second = (dense, paged_) if FIRST == "dense" else (paged_, dense)
first()
facts["C_after_first"] = "mahalo_engine._C" in sys.modules
second()
print(json.dumps(facts))
"""


def _run(script: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imports() -> dict:
    return _run(f"CLIS = {CLIS!r}\n" + _IMPORTS)


def test_import_mahalo_engine_imports_no_submodule(imports):
    # Not even the ops module or the Triton kernels: nothing can compile, allocate or size a cache.
    assert imports["modules_after_import"] == ["mahalo_engine"]


def test_training_modules_do_not_load_the_extension(imports):
    assert imports["C_after_training_import"] is False


@pytest.mark.parametrize("cli", CLIS)
def test_cli_help_works_without_the_extension(imports, cli):
    code, text = imports["helps"][cli]
    assert code in (0, None), code
    assert "usage:" in text and "--help" in text
    assert imports["C_after_helps"] is False


def test_every_public_name_imports_without_the_extension(imports):
    assert imports["missing_names"] == [] and imports["dir_lacks"] == []
    assert "NoSuchName" in imports["unknown_name"]
    assert imports["C_after_public_names"] is False


def test_first_kv_op_loads_the_extension(imports):
    assert imports["C_after_op"] is True
    assert imports["op_result_ok"] is True


def test_every_csrc_op_gets_a_fake_impl_at_load(imports):
    assert {"mahalo::kv_copy_ranges", "mahalo::kv_paged_fork"} <= set(imports["csrc_ops"])
    assert imports["ops_without_fake"] == []


@pytest.mark.parametrize("first", ["dense", "paged"])
def test_compile_before_any_eager_call_loads_the_ops(first):
    # aot_eager: Dynamo finds the op and AOTAutograd traces it with fake tensors (its fake impl),
    # like Inductor, without compiling C++ for the graph.
    facts = _run(f"BACKEND = 'aot_eager'\nFIRST = {first!r}\n" + _COMPILE_FIRST)
    assert facts["C_before"] is False and facts["C_after_first"] is True
    assert facts["dense_ok"] is True
    assert facts["paged_ok"] is True
    assert facts["shared_full_block"] == 3  # sequences 0, 1, 2 share the first (full) block
