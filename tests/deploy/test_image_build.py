"""The image build and its smoke test agree with the chart, the compose stack and the service.

The build + smoke test itself runs as a CI stage (scripts/ci_image.sh, after the test
suite: it takes minutes).  Here: the names and numbers the scripts rely on are the
ones the chart, compose and service use, and (opt-in, KAWHI_IMAGE_SMOKE=1, root)
the smoke test of an already built image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

import smoke_image  # noqa: E402


def _version() -> str:
    return re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _build_script_default_tag(variant: str) -> str:
    text = (SCRIPTS / "build_image.sh").read_text()
    template = re.search(r'^IMAGE="\$\{IMAGE:-(.+)\}"$', text, re.M).group(1)
    return template.replace("${VERSION}", _version()).replace("${VARIANT}", variant)


def test_the_readme_builds_runs_and_pushes_the_image_the_chart_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    tag = _build_script_default_tag("cpu")
    assert f"docker build -t {tag} ." in readme
    runs = [line for line in readme.splitlines() if line.startswith("docker run ")]
    assert runs and all(tag in line or line.endswith("\\") for line in runs), runs
    assert all("-p 127.0.0.1:8000:8000" in line for line in runs)  # the image's KAWHI_PORT
    assert "ENV KAWHI_HOST=0.0.0.0" in (ROOT / "Dockerfile").read_text()  # reachable through -p
    assert "docker push" in readme and "image.repository=" in readme


def test_build_tags_what_the_chart_and_compose_run() -> None:
    values = yaml.safe_load((ROOT / "helm" / "kawhi" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "kawhi" / "Chart.yaml").read_text())
    assert chart["appVersion"] == _version()
    for variant in ("cpu", "gpu"):
        chart_image = f"{values['image']['repository']}:{chart['appVersion']}-{variant}"
        assert _build_script_default_tag(variant) == chart_image
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert compose["services"]["kawhi"]["image"].replace("${VARIANT:-cpu}", "cpu") == _build_script_default_tag("cpu")
    gpu = yaml.safe_load((ROOT / "deploy" / "docker-compose.gpu.yml").read_text())
    assert gpu["services"]["kawhi"]["image"] == _build_script_default_tag("gpu")
    assert smoke_image.default_image() == _build_script_default_tag("cpu")


def test_smoke_expectations_are_the_services_and_the_charts() -> None:
    engine = (ROOT / "service" / "kawhi" / "engine" / "engine.py").read_text()
    assert f'TINY_MODEL_NAME = "{smoke_image.TINY_MODEL_NAME}"' in engine
    values = yaml.safe_load((ROOT / "helm" / "kawhi" / "values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == smoke_image.EXPECTED_UID
    request = smoke_image.example_request()
    group = request["groups"][0]
    assert group["image"]["data"] and len(group["responses"]) >= 2


def test_chroot_command_runs_as_the_image_user_with_only_its_environment(tmp_path: Path) -> None:
    config = {"User": "10001:10001", "WorkingDir": "/home/kawhi"}
    cmd = smoke_image.chroot_cmd(tmp_path, config, {"A": "1", "PATH": "/x"}, ["kawhi", "serve"])
    assert cmd[:4] == ["chroot", "--userspec=10001:10001", "--groups=", str(tmp_path)]
    assert cmd[4:8] == ["/usr/bin/env", "-i", "-C", "/home/kawhi"]
    assert cmd[8:] == ["A=1", "PATH=/x", "kawhi", "serve"]


def test_torch_from_a_local_wheel_never_falls_back_to_an_index() -> None:
    dockerfile = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    run = next(line for line in dockerfile.splitlines() if line.startswith("RUN") and "TORCH_FIND_LINKS" in line)
    assert '--no-index --no-deps --find-links "${TORCH_FIND_LINKS}"' in run


def test_ci_runs_the_image_stage_after_the_suite() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("python3 -m pytest -q\n") < ci.index("bash scripts/ci_image.sh")
    stage = (SCRIPTS / "ci_image.sh").read_text()
    assert "IMAGE STAGE SKIPPED" in stage and "scripts/build_image.sh" in stage and "scripts/smoke_image.py" in stage
    for script in ("build_image.sh", "ci_image.sh"):
        subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


@pytest.mark.slow
def test_smoke_of_the_built_image() -> None:
    """Opt-in (KAWHI_IMAGE_SMOKE=1): the smoke test of an image built earlier by scripts/build_image.sh."""
    if os.environ.get("KAWHI_IMAGE_SMOKE") != "1":
        pytest.skip("set KAWHI_IMAGE_SMOKE=1 to smoke-test a built image (CI runs it in scripts/ci_image.sh)")
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.fail("KAWHI_IMAGE_SMOKE=1 needs podman and root")
    image = smoke_image.default_image()
    if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
        pytest.fail(f"{image} is not built: bash scripts/build_image.sh")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "smoke_image.py"), image], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
