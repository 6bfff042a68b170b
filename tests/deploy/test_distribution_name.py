"""The distribution name: what the docs tell users to install is this project, and the
unrelated PyPI ``kawhi`` (which also ships a top-level module ``kawhi``) is named when present.

PyPI's ``kawhi`` (0.0.47, "A package inspired by Kawhi Leonard") is not ours; ours is
``kawhi-rl``. The clash check reads real distribution metadata (a ``*.dist-info`` folder on
the path, as pip leaves it), in a subprocess so the warning is the first import's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "Dockerfile", ROOT / "examples" / "verl" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
# `pip install kawhi`, `pip install 'kawhi[server]'`, "kawhi[engine]" as a requirement: the foreign package
FOREIGN_INSTALL = re.compile(r"""pip install ['"]?kawhi(?![-_\w])|(?<![-\w])kawhi\[""")


def test_the_distribution_is_kawhi_rl_and_its_extras_name_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kawhi-rl"
    self_refs = [r for extra in project["optional-dependencies"].values() for r in extra if r.startswith("kawhi")]
    assert self_refs and all(r.startswith("kawhi-rl[") for r in self_refs), self_refs


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_installs_the_unrelated_kawhi(path: Path) -> None:
    hits = [line.strip() for line in path.read_text().splitlines() if FOREIGN_INSTALL.search(line)]
    assert not hits, hits


def test_error_messages_name_the_distribution() -> None:
    from kawhi.extras import missing_extra_message

    exc = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert "pip install 'kawhi-rl[engine]'" in missing_extra_message(exc)


def _import_with(tmp_path: Path, summary: str | None) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    if summary is not None:
        info = site / "kawhi-0.0.47.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kawhi\nVersion: 0.0.47\nSummary: {summary}\n")
    site.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "service"), str(ROOT / "client")])}
    return subprocess.run([sys.executable, "-c", "import kawhi, kawhi_client"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)


def test_the_unrelated_kawhi_installed_alongside_is_named_once(tmp_path: Path) -> None:
    out = _import_with(tmp_path, "A package inspired by Kawhi Leonard of the Toronto Raptors")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1, out.stderr
    assert "unrelated PyPI package 'kawhi' 0.0.47" in warnings[0] and "pip install kawhi-rl" in warnings[0]


def test_no_warning_without_it_or_for_an_old_install_of_this_project_under_that_name(tmp_path: Path) -> None:
    assert "RuntimeWarning" not in _import_with(tmp_path / "none", None).stderr
    ours = "KAWHI reward shaping for RL of vision-language models"
    assert "RuntimeWarning" not in _import_with(tmp_path / "ours", ours).stderr
