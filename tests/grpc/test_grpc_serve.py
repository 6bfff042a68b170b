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
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_grpc
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    fresh = gen_grpc.generate()
    assert set(fresh) == {"kawhi_pb2.py", "kawhi_pb2.pyi", "kawhi_pb2_grpc.py"}
    for name, text in fresh.items():
        committed = (gen_grpc.OUT / name).read_text()
        assert committed == text, f"{name} is stale: run python3 scripts/gen_grpc.py"
    assert "from kawhi_client.grpc._proto import kawhi_pb2" in fresh["kawhi_pb2_grpc.py"]


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
