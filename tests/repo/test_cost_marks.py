"""The cost marks of tests/conftest.py name real files and tests: a renamed test would
otherwise silently drop out of its mark and slow the fast subset down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
import conftest  # noqa: E402

TEST_FILES = {p.name: p for p in TESTS.rglob("test_*.py") if "support" not in p.parts}


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("key", sorted(conftest.TEST_MARKS))
def test_every_marked_test_exists(key: str) -> None:
    file, name = key.split("::")
    assert file in TEST_FILES, f"{key}: no tests/**/{file}"
    assert name in defined_tests(TEST_FILES[file]), f"{key}: {file} defines no {name}"


def test_every_marked_file_exists_and_names_are_unique() -> None:
    assert set(conftest.FILE_MARKS) <= set(TEST_FILES), set(conftest.FILE_MARKS) - set(TEST_FILES)
    names = [p.name for p in TESTS.rglob("test_*.py") if "support" not in p.parts]
    assert len(names) == len(set(names)), "two test files share a name: the marks are keyed by file name"


def test_only_registered_cost_markers_are_given() -> None:
    used = {m for marks in (*conftest.FILE_MARKS.values(), *conftest.TEST_MARKS.values()) for m in marks}
    assert used <= set(conftest.COST_MARKERS)
