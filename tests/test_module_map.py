"""docs/modules.md lists every module of the packages, and nothing that is gone."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_module_map_matches_the_tree():
    listed = set(re.findall(r"^- `([\w/]+\.py)` — \S", (ROOT / "docs" / "modules.md").read_text(),
                            re.M))
    tree = {p.relative_to(ROOT).as_posix()
            for pkg in ("mahalo_engine", "triton_kernels", "training", "bench")
            for p in (ROOT / pkg).rglob("*.py")}
    assert sorted(tree - listed) == [], "modules missing from docs/modules.md"
    assert sorted(listed - tree) == [], "docs/modules.md lists modules that do not exist"
