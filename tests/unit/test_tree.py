"""The unit-test tree mirrors the package tree (tests/unit/<pkg>/... ↔ megatron_mmpl/<pkg>/...), and every file
named test_*.py holds tests (helpers are named for what they hold)."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_unit_test_folders_are_package_folders():
    unit = ROOT / "tests" / "unit"
    stray = [str(d.relative_to(unit)) for d in unit.rglob("*") if d.is_dir() and d.name != "__pycache__"
             and not (ROOT / "megatron_mmpl" / d.relative_to(unit)).is_dir()]
    assert not stray, f"tests/unit folders with no package folder: {stray}"


def test_every_test_file_holds_tests():
    empty = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if not any(n.startswith("test_") for n in names):
            empty.append(str(path.relative_to(ROOT)))
    assert not empty, f"test_*.py files without tests (rename the helpers): {empty}"
