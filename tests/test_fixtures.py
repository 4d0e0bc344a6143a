"""The tests' own layout: shared fixtures are defined once, in conftest.py, and never imported."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def fixtures_of(tree: ast.Module) -> set[str]:
    """Names of the module-level functions decorated with ``pytest.fixture`` (called or not)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) == "pytest.fixture":
                    names.add(node.name)
    return names


def test_no_test_module_imports_conftest():
    importing = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) else
                       [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if "conftest" in modules:
                importing.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert importing == []


def test_shared_fixtures_are_defined_once():
    shared = fixtures_of(ast.parse((TESTS / "conftest.py").read_text()))
    assert {"tiny_checkpoint", "clf_checkpoint", "tok", "hf_tokenizer", "hub"} <= shared
    redefined = {f"{path.relative_to(TESTS)}: {name}" for path in sorted(TESTS.rglob("test_*.py"))
                 for name in fixtures_of(ast.parse(path.read_text())) & shared}
    assert redefined == set()
