"""Packaging: a user's torch is theirs (no upper bound, setup keeps an installed one),
and a command whose extra is not installed says which one to install, in one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def test_torch_is_required_from_2_4_with_no_upper_bound() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = [Requirement(r) for r in project["optional-dependencies"]["engine"] if Requirement(r).name == "torch"]
    assert len(torch) == 1
    spec = torch[0].specifier
    assert {s.operator for s in spec} == {">="} and {s.version for s in spec} == {"2.4"}
    assert all(spec.contains(v) for v in ("2.4.0", "2.13.0", "2.14.0", "2.15.1", "3.0.0"))
    assert "torch" not in " ".join(project["dependencies"])  # the light client has none


def fake_python(tmp_path: Path, torch_version: str | None) -> tuple[Path, Path]:
    """A `python` that answers the metadata query as if ``torch_version`` were installed
    (None: no torch) and records every `-m pip` call instead of running it."""
    calls = tmp_path / "pip-calls"
    script = tmp_path / "python"
    answer = f'echo "{torch_version}"; exit 0' if torch_version else "exit 1"
    script.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then {answer}; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; echo "$*" >> "{calls}"; exit 0; fi
exit 3
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, calls


def run_install_torch(python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts/install_torch.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(python)}, check=True)


def test_setup_keeps_an_installed_torch(tmp_path: Path) -> None:
    python, calls = fake_python(tmp_path, "2.15.0+cu130")
    out = run_install_torch(python)
    assert "keeping the installed torch 2.15.0+cu130" in out.stdout
    assert not calls.exists()  # pip was never asked for anything


def test_setup_installs_the_cpu_pin_only_when_there_is_no_torch(tmp_path: Path) -> None:
    python, calls = fake_python(tmp_path, None)
    run_install_torch(python)
    assert calls.read_text().splitlines() == ["install torch==2.13.0"]


def test_setup_sh_runs_the_torch_step_before_the_project() -> None:
    text = (ROOT / "scripts/setup.sh").read_text()
    assert 'pip install "torch' not in text  # only install_torch.sh installs torch
    assert text.index("scripts/install_torch.sh") < text.index('pip install -e ".[dev]"')


def without(*modules: str) -> str:
    """Python code that makes importing ``modules`` fail as in an install without them."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


def run_entry_point(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    program = code + f"from kawhi.extras import main\nsys.exit(main({list(argv)!r}))\n"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'service'}{os.pathsep}{ROOT / 'client'}"}
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def test_an_engine_command_in_a_client_only_install_names_the_extra(tmp_path: Path) -> None:
    out = run_entry_point(without("torch", "transformers", "numpy", "PIL", "scipy"),
                          "reweight", "examples/rollouts.jsonl", "-o", str(tmp_path / "out.jsonl"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith("kawhi reweight needs the 'engine' extra")
    assert "pip install 'kawhi-rl[engine]'" in lines[0]
    assert "https://download.pytorch.org/whl/cpu" in lines[0]  # how to get torch without the CUDA download
    assert not (tmp_path / "out.jsonl").exists()


def test_serve_without_the_server_extra_names_it() -> None:
    out = run_entry_point(without("fastapi", "uvicorn"), "serve")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "kawhi-rl[server]" in out.stderr


def test_the_console_script_is_the_guarded_entry_point() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kawhi"] == "kawhi.extras:main"
