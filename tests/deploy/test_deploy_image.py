"""Deployment checks, part 2: the Dockerfile, deploy/ (compose, Prometheus, Grafana), a live
server with the chart's environment, the operations guide (part 1, the chart: test_deploy.py).

* hadolint on the Dockerfile (fails on warning or worse; every inline ignore must
  carry a justification) and checks of what the image promises (non-root, kawhi-tiny
  by default, /healthz healthcheck, port);
* promtool on deploy/prometheus (config, rules, rule unit tests); every metric and
  label the dashboard, alerts and autoscaler use exists in the service's metrics;
* a real ``kawhi serve`` started with the chart's ConfigMap as its environment,
  probed on the paths the Deployment's probes use.

Tools as in test_deploy.py (scripts/install_deploy_tools.sh).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from deploy_support import (  # noqa: F401  (the fixtures hadolint, helm, promtool, rendered are used by name)
    CONTAINER_PORT,
    DEPLOY,
    DOCKERFILE,
    GRPC_PORT,
    IMAGE_UID,
    OPERATIONS,
    OTHER_ENV,
    ROOT,
    container_env,
    docs_values_example,
    hadolint,
    helm,
    helm_schema,
    kawhi_container,
    one,
    promtool,
    rendered,
    run,
)

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
    # listens where the chart expects; kawhi-tiny unless KAWHI_MODEL is given
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
    # the default model, kawhi-tiny, travels inside the wheel (package data), so the image serves it with no mount
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "models/tiny/*.safetensors" in pyproject
    assert (ROOT / "service" / "kawhi" / "models" / "tiny" / "model.safetensors").is_file()


# ============================================================================ deploy/: compose, Prometheus, Grafana


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_compose_file() -> None:
    c = compose()
    assert set(c["services"]) == {"kawhi", "redis", "prometheus", "grafana"}
    kawhi = c["services"]["kawhi"]
    assert (DEPLOY / kawhi["build"]["context"] / kawhi["build"]["dockerfile"]).resolve() == DOCKERFILE
    fields = helm_schema.settings_fields()
    for name in kawhi["environment"]:
        assert name in OTHER_ENV or (name.startswith("KAWHI_") and name[6:].lower() in fields), name
    # ${KAWHI_...} interpolations are settings too (compose-only knobs have no KAWHI_ prefix)
    for var in re.findall(r"\$\{(KAWHI_[A-Z0-9_]+)", (DEPLOY / "docker-compose.yml").read_text()):
        assert var[6:].lower() in fields, var
    assert kawhi["environment"]["KAWHI_REDIS_URL"] == "redis://redis:6379/0"
    assert kawhi["environment"]["KAWHI_MODEL"] == "${KAWHI_MODEL:-}", "empty by default: the embedded kawhi-tiny"
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
    from kawhi.pipeline.metrics import Metrics
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
    the startup/readiness path turns 200 once kawhi-tiny is loaded, liveness answers,
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
    fields = helm_schema.settings_fields()
    for name in set(re.findall(r"\bKAWHI_([A-Z0-9_]+)\b", text)):
        assert name.lower() in fields, f"docs/operations.md names KAWHI_{name}, which kawhi serve does not have"
