"""The chart's pieces for group affinity across replicas: the optional headless Service
(client-side rendezvous hashing over the pods) and an ingress that hashes on the routing
key header. Renders helm/kawhi with the tools and helpers of tests/test_deploy.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from deploy_support import ALL_VALUES, CHART, NAMESPACE, RELEASE, by_kind, helm, one, run  # noqa: F401
from kawhi_client.routing import ROUTING_HEADER


def _render(helm_bin: str, *args: str) -> list[dict]:
    proc = run([helm_bin, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args])
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_headless_service_selects_the_server_pods_and_is_off_by_default(helm: str) -> None:
    assert len(by_kind(_render(helm), "Service")) == 1
    docs = _render(helm, "-f", str(ALL_VALUES))
    svc, headless = one(docs, "Service"), one(docs, "Service", "server-headless")
    assert headless["spec"]["clusterIP"] == "None" and not headless["spec"]["publishNotReadyAddresses"]
    assert headless["spec"]["selector"] == svc["spec"]["selector"]
    assert headless["metadata"]["name"] == svc["metadata"]["name"] + "-headless"
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # clients dial the pods on the container's own ports: HTTP, and gRPC when it is on
    assert headless["spec"]["ports"] == [
        {"name": "http", "port": ports["http"], "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": ports["grpc"], "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]
    sm = one(docs, "ServiceMonitor")  # scrapes through the normal Service only: no pod twice
    assert not sm["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()


def test_a_long_release_name_keeps_the_headless_name_valid(helm: str) -> None:
    docs = _render(helm, "--set", "service.headless.enabled=true", "--set", "fullnameOverride=" + "k" * 63)
    names = [d["metadata"]["name"] for d in by_kind(docs, "Service")]
    assert all(len(n) <= 63 and not n.endswith("-") for n in names) and len(set(names)) == 2


def test_the_ingress_example_hashes_on_the_routing_key_header(helm: str) -> None:
    ingress = one(_render(helm, "-f", str(ALL_VALUES)), "Ingress")
    var = "$http_" + ROUTING_HEADER.lower().replace("-", "_")  # how NGINX names a request header
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == var
    ops = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert f'upstream-hash-by: "{var}"' in ops
