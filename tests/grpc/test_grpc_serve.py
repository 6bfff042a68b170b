"""The committed gRPC stubs match the proto, and `kawhi serve` runs HTTP and gRPC side by side."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from server_fixtures import ROOT, free_port, small_group, subprocess_env, wait_ready

grpc = pytest.importorskip("grpc", reason="the gRPC tests need the [grpc] extra (bash scripts/setup.sh installs it)")


def test_committed_stubs_are_what_the_proto_generates() -> None:
    pytest.importorskip("grpc_tools", reason="regenerating the stubs needs grpcio-tools (the [dev] extra)")
    import gen_grpc
    fresh = gen_grpc.generate()
    assert set(fresh) == {"kawhi_pb2.py", "kawhi_pb2.pyi", "kawhi_pb2_grpc.py"}
    committed = {name: (gen_grpc.OUT / name).read_text() for name in fresh}
    for name, text in fresh.items():  # the installed grpcio-tools' own version is not what the stubs mean
        assert gen_grpc.version_free(committed[name]) == gen_grpc.version_free(text), \
            f"{name} is stale: run python3 scripts/gen_grpc.py"
    assert "from kawhi_client.grpc._proto import kawhi_pb2" in fresh["kawhi_pb2_grpc.py"]


def test_the_stubs_runtime_floors_are_the_declared_ones() -> None:
    """The committed stubs refuse grpcio/protobuf older than their stamps: pyproject must not promise older."""
    tomllib = pytest.importorskip("tomllib")
    import gen_grpc
    from packaging.requirements import Requirement
    stamps = gen_grpc.stamped_versions({n: (gen_grpc.OUT / n).read_text() for n in gen_grpc.FILES})
    assert stamps["grpcio"] and stamps["protobuf"].count(".") == 2, stamps
    grpc_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["grpc"]
    floors = {r.name: s.version for r in map(Requirement, grpc_extra) for s in r.specifier if s.operator == ">="}
    assert floors["grpcio"] == stamps["grpcio"] and floors["protobuf"] == stamps["protobuf"], (floors, stamps)


def test_version_free_masks_only_the_stamps() -> None:
    import gen_grpc
    grpc_stub = (gen_grpc.OUT / "kawhi_pb2_grpc.py").read_text()
    restamped = grpc_stub.replace("GRPC_GENERATED_VERSION = '1.85.1'", "GRPC_GENERATED_VERSION = '9.9.9'")
    assert restamped != grpc_stub and gen_grpc.version_free(restamped) == gen_grpc.version_free(grpc_stub)
    renamed = grpc_stub.replace("/kawhi.v1.Kawhi/Reweight'", "/kawhi.v1.Kawhi/Reweigh'")
    assert renamed != grpc_stub and gen_grpc.version_free(renamed) != gen_grpc.version_free(grpc_stub)
    pb2 = (gen_grpc.OUT / "kawhi_pb2.py").read_text()
    assert "<version>" in gen_grpc.version_free(pb2).split("_runtime_version.Domain.PUBLIC,")[1][:40]


def test_serve_answers_http_and_grpc_and_drains_on_sigterm(tmp_path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from kawhi_client import Client, GrpcClient

    port, grpc_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kawhi.serve", "--port", str(port), "--drain-timeout-s", "30"],
        env=subprocess_env(KAWHI_GRPC_PORT=str(grpc_port), KAWHI_API_KEYS="k"), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)
        with GrpcClient(f"127.0.0.1:{grpc_port}", "k", wait_ready=60) as g, Client(f"http://127.0.0.1:{port}", "k") as h:
            a, b = g.reweight([small_group(1)]), h.reweight([small_group(1)])
            assert a[0].responses[0].token_advantages == b[0].responses[0].token_advantages
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert '"grpc listening"' in text or "grpc listening" in text
