"""Imports point down only: the project's import graph against the layer order written below.

Every import of a project module counts, at module level or inside a function: ``import X``,
``from X import name`` (an arrow to ``X.name`` when that is a module, else to ``X``) and relative
imports. A module belongs to the most specific node of ``LAYERS`` that names it (``"pkg.folder.*"``:
the folder and everything in it; ``"pkg.module"``: that module alone); every module must belong to
one. Rules:

- an arrow from a node to a node of a later layer points up: none allowed;
- nodes of one layer do not import each other (siblings stay independent);
- inside a folder node, modules import each other without a cycle;
- a private name (``_x``) is imported only from its own folder;
- a function-local import of a project module says why, in a comment just above it (what it
  costs to import at module level: torch, Triton, transformers, the engine).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("triton_kernels", "mahalo_engine", "training", "bench")

# Lowest first: triton_kernels < mahalo_engine < training < bench, and inside each package.
LAYERS: list[list[str]] = [
    # triton_kernels: generic checks, what the ops share, one folder per op, the faces.
    ["triton_kernels.argcheck"],
    ["triton_kernels.checks", "triton_kernels.device"],
    ["triton_kernels.multihead.*", "triton_kernels.cascade.*"],
    ["triton_kernels.reference"],
    ["triton_kernels"],
    # mahalo_engine: leaf modules, support code, caches, layers, models, policy/PRM, the engine,
    # the CLI, the package face.
    ["mahalo_engine.boundary", "mahalo_engine.stop_conditions", "mahalo_engine.model_config",
     "mahalo_engine.distributed"],
    ["mahalo_engine.utils.*"],
    ["mahalo_engine.text", "mahalo_engine.ops", "mahalo_engine.heads", "mahalo_engine.tiny",
     "mahalo_engine.sharded"],
    ["mahalo_engine.cache", "mahalo_engine.paged"],
    ["mahalo_engine.layouts"],
    ["mahalo_engine.layers.*"],
    ["mahalo_engine.models.*"],
    ["mahalo_engine.policy", "mahalo_engine.value_model"],
    ["mahalo_engine.engine.*"],
    ["mahalo_engine.__main__"],
    ["mahalo_engine"],
    # training: readers and building blocks, encoding, batches, log-probs, the loop, the CLIs.
    ["training.readers", "training.batching", "training.losses", "training.checkpoint",
     "training.distributed"],
    ["training.encode"],
    ["training.collate"],
    ["training.logps", "training.model_io"],
    ["training.ref_logps", "training.trainer"],
    ["training.sft", "training.mah_dpo", "training.prm", "training.labels", "training.convert",
     "training.data", "training.soup"],
    ["training"],
    # bench: plumbing, sections, the runner.
    ["bench.common"],
    ["bench.decode", "bench.heads", "bench.kv", "bench.attention", "bench.quality.*"],
    ["bench.search", "bench.train", "bench.graph_check", "bench.device_report", "bench.scaling"],
    ["bench.__main__"],
    ["bench"],
]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module that ``import name`` loads last (a name inside a module → the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, list[str], ast.stmt, bool]]:
    """``(target module, imported names, node, function-local)`` for each project import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(_resolve(a.name), []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            targets = [(_resolve(f"{base}.{n}"), [n]) if f"{base}.{n}" in MODULES
                       else (_resolve(base), [n]) for n in names]
        else:
            continue
        for target, names in targets:
            if target is not None and target != module:
                out.append((target, names, node, id(node) in local))
    return out


def _node(module: str) -> tuple[int, str]:
    """``(layer index, node)`` of a module: the most specific node naming it."""
    best = None
    for i, layer in enumerate(LAYERS):
        for node in layer:
            folder = node.endswith(".*")
            stem = node[:-2] if folder else node
            if module == stem or (folder and module.startswith(stem + ".")):
                if best is None or len(stem) > len(best[1].rstrip(".*")):
                    best = (i, node)
    if best is None:
        raise AssertionError(f"{module} is in no layer: place it in LAYERS "
                             "(tests/test_import_layers.py)")
    return best


def _folder(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_every_module_has_a_layer_and_every_node_a_module():
    for module in MODULES:
        _node(module)
    for layer in LAYERS:
        for node in layer:
            stem = node[:-2] if node.endswith(".*") else node
            assert stem in MODULES, f"LAYERS names {node}, which does not exist"


def test_no_import_points_up_or_sideways():
    bad = []
    for module in sorted(MODULES):
        src_layer, src_node = _node(module)
        for target, _, node, _ in _imports(module):
            dst_layer, dst_node = _node(target)
            if dst_node == src_node:
                continue
            if dst_layer >= src_layer:
                kind = "up" if dst_layer > src_layer else "sideways"
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{node.lineno}: {module} -> "
                           f"{target} ({kind}: {src_node} -> {dst_node})")
    assert bad == [], "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle_inside_a_folder():
    graph = {m: {t for t, *_ in _imports(m) if _node(t)[1] == _node(m)[1]} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_private_names_are_imported_only_inside_their_folder():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{node.lineno}: {n} from {t}"
           for m in sorted(MODULES) for t, names, node, _ in _imports(m) for n in names
           if n.startswith("_") and not n.startswith("__") and _folder(t) != _folder(m)]
    assert bad == [], "private names imported across folders:\n" + "\n".join(bad)


def _says_why(lines: list[str], lineno: int) -> bool:
    """A comment line right above the import, skipping the other imports of its block."""
    i = lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if not (text.startswith(("import ", "from ")) or text == "" or text.endswith((",", ")"))):
            return False
        i -= 1
    return False


def test_function_local_project_imports_say_why():
    bad = []
    for module in sorted(MODULES):
        lines = MODULES[module].read_text().splitlines()
        for _, _, node, local in _imports(module):
            if local and "#" not in lines[node.lineno - 1] and not _says_why(lines, node.lineno):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{node.lineno}: "
                           f"{lines[node.lineno - 1].strip()}")
    assert bad == [], ("function-local project imports without a comment saying what importing "
                       "them at module level would cost:\n" + "\n".join(sorted(set(bad))))
