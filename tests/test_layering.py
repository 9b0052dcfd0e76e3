"""Package layering: launch/ and eval/ build on train/, never the reverse, so there is no package-level cycle.

    detoxrl.train    imports nothing else of detoxrl
    detoxrl.eval     imports detoxrl.train
    detoxrl.launch   imports detoxrl.train

Checked on the source (AST), including imports inside functions, which a runtime check would miss.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

ALLOWED = {"train": {"train"}, "eval": {"eval", "train"}, "launch": {"launch", "train"}}


def detoxrl_imports(path: Path) -> set[tuple[str, int]]:
    """(sub-package, line) of every `detoxrl.<sub-package>` import in a file, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "detoxrl" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    wrong = [f"{path.relative_to(REPO)}:{line} imports detoxrl.{other}"
             for path in files for other, line in sorted(detoxrl_imports(path)) if other not in ALLOWED[package]]
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from detoxrl.launch.plan import make_plan\n    import detoxrl.eval.cli\n")
    assert detoxrl_imports(src) == {("launch", 2), ("eval", 3)}
