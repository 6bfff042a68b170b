"""Install truth: every third-party module the code imports is declared in the extra that installs it.

The imports are read from the source (ast, including imports inside functions), mapped
to the distribution that provides them here (importlib.metadata), and checked against
pyproject.toml's dependencies and extras. Modules a dependency loads lazily for a
feature we use (starlette's form parser for multipart uploads) are listed by hand.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service" / "kawhi"

# feature -> module a dependency imports lazily for it (not visible in our own imports)
LAZY = {"server": ["python_multipart"]}  # starlette Request.form(): POST /v1/images multipart

# which source folders each extra must cover
AREAS = {
    "engine": [SERVICE / "engine", SERVICE / "models", SERVICE / "pipeline", SERVICE / "errors.py", SERVICE / "cli.py"],
    "server": [SERVICE / "server", SERVICE / "grpc"],
    "grpc": [ROOT / "client" / "kawhi_client" / "grpc"],
}
OWN = {"kawhi", "kawhi_client"}
# helpers for tests and benchmarks only, documented as needing the dev extra
DEV_ONLY = {SERVICE / "models" / "qwen_tokenizer.py"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared(extra: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {_name(r) for r in project.get("dependencies", [])}
    todo, seen = [extra], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in project["optional-dependencies"][name]:
            match = re.match(r"kawhi-rl\[([\w,-]+)\]", req.replace(" ", ""))
            if match:
                todo.extend(match.group(1).split(","))
            else:
                out.add(_name(req))
    return out


def imported_modules(paths: list[Path]) -> set[str]:
    modules: set[str] = set()
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            if file in DEV_ONLY:
                continue
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in OWN and m != "__future__"}


@pytest.mark.parametrize("extra", sorted(AREAS))
def test_every_import_is_declared_in_its_extra(extra: str) -> None:
    provided = md.packages_distributions()
    allowed = declared(extra)
    missing = []
    for module in sorted(imported_modules(AREAS[extra]) | set(LAZY.get(extra, []))):
        dists = {d.lower().replace("_", "-") for d in provided.get(module, [])}
        if not dists:
            missing.append(f"{module} (not installed here: which distribution provides it?)")
        elif not dists & allowed:
            missing.append(f"{module} (from {sorted(dists)})")
    assert not missing, f"imported but not declared in kawhi-rl[{extra}]: {missing}"


def test_the_server_extra_declares_form_parsing() -> None:
    assert "python-multipart" in declared("server")
    assert "python-multipart" not in declared("engine")


def test_declared_versions_are_the_installed_ones() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", [])) + [
        r for name in ("engine", "server") for r in project["optional-dependencies"][name] if not r.startswith("kawhi-rl[")]
    wrong = []
    for text in reqs:
        req = Requirement(text)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            wrong.append(f"{req.name} not installed")
            continue
        if version not in req.specifier:
            wrong.append(f"{req.name} {version} not in {req.specifier}")
    assert not wrong, wrong
