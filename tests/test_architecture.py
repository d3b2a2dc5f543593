"""Imports point one way (README, "Layout"): every module's imports, read with ``ast``, stay inside what its
package may use.

    ir ← strategy;  frontend → strategy, ir;  ir ← cluster ← cost ← passes (cost and passes read strategy);
    backends read ir, cluster, cost and strategy;  compiler wires them all.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {
    "ir": {"ir"},
    "strategy": {"strategy", "ir"},
    "cluster": {"cluster", "ir"},
    "cost": {"cost", "ir", "cluster", "strategy"},
    "passes": {"passes", "ir", "cluster", "cost", "strategy"},
    "backends": {"backends", "ir", "cluster", "cost", "strategy"},
    "frontend": {"frontend", "ir", "strategy"},
    "compiler": {"compiler", "frontend", "ir", "strategy", "cluster", "cost", "passes", "backends"},
}
"""Package -> the sbpc packages its modules may import."""
NOT_PACKAGES = {"tests", "examples", "benchmarks", "scripts", "build"}


def sbpc_packages() -> list[str]:
    """Top-level folders of the repository that are Python packages (hold an ``__init__.py``)."""
    return sorted(p.name for p in ROOT.iterdir()
                  if (p / "__init__.py").is_file() and p.name not in NOT_PACKAGES and not p.name.startswith("."))


def module_files(package: str) -> list[Path]:
    """Every ``.py`` file of ``package``."""
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    """``passes/planner/search.py`` -> ``passes.planner.search`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, lazy ones inside functions included."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, one level up per extra dot
                base = package[:len(package) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def test_every_package_has_a_place_in_the_layering():
    missing = [p for p in sbpc_packages() if p not in MAY_IMPORT]
    assert not missing, (f"packages {missing} are not in tests/test_architecture.py MAY_IMPORT; add each with the "
                         "packages it may import (and the README's import-direction line)")


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_point_the_right_way(package: str):
    sbpc = set(sbpc_packages())
    wrong = []
    for path in module_files(package):
        for line, target in imported_modules(path):
            top = target.split(".")[0]
            if top in sbpc and top not in MAY_IMPORT[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module_name(path)} imports {target} "
                             f"({package} -> {top})")
    allowed = ", ".join(sorted(MAY_IMPORT[package]))
    assert not wrong, f"{package} may import only {allowed}; found:\n" + "\n".join(wrong)


def test_the_checker_sees_wrong_arrows(tmp_path, monkeypatch):
    """A module of ``cost`` importing ``passes`` (lazily, inside a function) is reported with its line."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for package in ("cost", "passes"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "cost" / "bad.py").write_text("import math\n\n\ndef f():\n    from passes.boxing import x\n")
    (tmp_path / "cost" / "fine.py").write_text("from . import bad\nfrom .bad import f\n")
    assert imported_modules(tmp_path / "cost" / "bad.py") == [(1, "math"), (5, "passes.boxing")]
    assert imported_modules(tmp_path / "cost" / "fine.py") == [(1, "cost"), (2, "cost.bad")]
    with pytest.raises(AssertionError, match=r"cost/bad\.py:5: cost\.bad imports passes\.boxing \(cost -> passes\)"):
        test_imports_point_the_right_way("cost")
