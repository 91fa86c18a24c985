"""The shape of the house (docs/architecture.md): layers, no import circle, each concept in its package.

The import-linter contract in pyproject.toml fixes the layers (errors < core < data, models, attacks < methods,
evaluate < train < analysis < cli), forbids import circles between the modules of any package and keeps private
modules inside their package. The tests below add what it cannot express: nothing but the package face at the
root, no function-local import without a reason, no private name imported across a package boundary.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

from importlinter import cli as importlinter_cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fastrobust"
PACKAGES = {"core", "data", "models", "attacks", "methods", "evaluate", "train", "analysis", "cli"}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def test_the_import_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)  # lint-imports reads pyproject.toml from the current folder
    assert importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_the_root_holds_only_the_package_face_and_the_errors():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py", "errors.py"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == PACKAGES


def test_function_local_imports_carry_a_one_word_reason():
    """Imports sit at the top of a module; inside a function only for CLI start-up time or an optional dependency,
    said by a comment on the line (``# startup``, ``# optional``, ...)."""
    unexplained = []
    for path in modules():
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "#" not in lines[node.lineno - 1]:
                    unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "\n".join(unexplained)


def test_no_private_name_is_imported_across_a_package_boundary():
    crossing = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastrobust")):
                continue
            target = node.module.split(".")
            target_package = target[1] if len(target) > 1 else ""
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if private and target_package != package_of(path):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {', '.join(private)} from {node.module}")
    assert not crossing, "\n".join(crossing)


def test_a_planted_import_circle_breaks_the_contract(tmp_path, monkeypatch):
    """The contract can fail: a copy of the package with core importing train is refused."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "fastrobust", ignore=shutil.ignore_patterns("__pycache__"))
    values = copy / "fastrobust" / "core" / "values.py"
    values.write_text(values.read_text() + "\nfrom fastrobust.train import config as _planted  # noqa: E402\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(copy))
    for name in [m for m in list(sys.modules) if m == "fastrobust" or m.startswith("fastrobust.")]:
        monkeypatch.delitem(sys.modules, name)
    assert importlinter_cli.lint_imports(config_filename=str(tmp_path / "pyproject.toml"), no_cache=True) == 1
