"""The repository carries its own docs: every Markdown link resolves to a file inside it,
no text points outside it, and docs/method.md names code and tests that exist."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from parts so this file does not match itself.
OUTSIDE = [".." + "/shared", "shared/" + "API.md", "shared/" + "METHOD.md", "/wo" + "rk/"]

# [text](target), ![alt](target) and reference definitions "[label]: target"
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
EXTERNAL = ("http://", "https://", "mailto:", "pkg://")


def repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what a clone or a commit holds)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sorted({ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()})


def text_of(path: Path) -> str | None:
    if path.stat().st_size > 2_000_000:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # a binary file (images, weights)


def markdown_links(text: str) -> list[str]:
    prose = FENCE.sub("", text)  # a link-like string inside a code block is code, not a link
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in markdown_links(md.read_text(encoding="utf-8")):
        if target.startswith(EXTERNAL) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (md.parent / path).resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{target} leaves the repository")
        elif not resolved.exists():
            problems.append(f"{target} does not exist")
    return problems


MARKDOWN = [p for p in repo_files() if p.suffix == ".md"]


def test_the_link_checker_catches_what_it_should(tmp_path: Path) -> None:
    outside = ".." + "/sha" + "red/SPEC.md"
    text = (f"[ok](#x) [web](https://example.org) [out]({outside}) ![img](missing.png)\n"
            "```\n[in a fence](nowhere.md)\n```\n[ref]: ../../elsewhere.md\n")
    assert markdown_links(text) == ["#x", "https://example.org", outside, "missing.png", "../../elsewhere.md"]
    md = tmp_path / "repo" / "page.md"
    md.parent.mkdir()
    md.write_text(text)
    assert broken_links(md, root=md.parent) == [
        f"{outside} leaves the repository", "missing.png does not exist", "../../elsewhere.md leaves the repository"]


@pytest.mark.parametrize("md", MARKDOWN, ids=[str(p.relative_to(ROOT)) for p in MARKDOWN])
def test_every_markdown_link_resolves_inside_the_repository(md: Path) -> None:
    assert broken_links(md) == []


def test_no_text_points_outside_the_repository() -> None:
    offenders = []
    for path in repo_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if any(o in line for o in OUTSIDE):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert offenders == []


def test_the_repository_has_its_specification_contract_and_licence() -> None:
    for name in ("docs/method.md", "docs/api.md", "LICENSE"):
        assert (ROOT / name).is_file(), name
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "docs/method.md" in readme and "docs/api.md" in readme


# ---------------------------------------------------------------- method.md names real code and tests

CODE_REF = re.compile(r"`(kawhi(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def defined_names(path: Path) -> set[str]:
    """Top-level functions/classes/assignments and Class.method names of a module."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{n.name}" for n in node.body
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def resolves(dotted: str) -> bool:
    """``kawhi.engine.weights.token_weights`` -> does service/kawhi/engine/weights.py define it?"""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        base = ROOT / "service" / Path(*parts[:split])
        module = base.with_suffix(".py") if not base.is_dir() else base / "__init__.py"
        if module.is_file():
            rest = ".".join(parts[split:])
            return rest == "" or rest in defined_names(module)
    return False


def test_every_code_and_test_named_in_method_md_exists() -> None:
    text = (ROOT / "docs/method.md").read_text(encoding="utf-8")
    code = sorted(set(CODE_REF.findall(text)))
    tests = sorted(set(TEST_REF.findall(text)))
    assert len(code) > 20 and len(tests) > 30  # the page really maps equations to code and tests
    assert [c for c in code if not resolves(c)] == []
    missing = [f"{f}::{t}" for f, t in tests
               if not (ROOT / f).is_file() or t not in defined_names(ROOT / f)]
    assert missing == []


def test_every_section_of_method_md_names_code_and_a_test() -> None:
    text = (ROOT / "docs/method.md").read_text(encoding="utf-8")
    sections = re.split(r"^## (§\d)", text, flags=re.MULTILINE)[1:]
    numbered = dict(zip(sections[::2], sections[1::2]))
    assert sorted(numbered) == ["§0", "§1", "§2", "§3", "§4", "§5", "§6"]
    for number in ("§0", "§1", "§2", "§3", "§4", "§5"):  # §6 is what the paper reports
        body = numbered[number]
        assert "**Code:**" in body and "**Test:**" in body, number
