"""`kawhi serve` start-up as an operator meets it: a taken port or a model that does not load
is one line on stderr and a non-zero exit (real sockets, a real subprocess server)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from server_fixtures import ROOT, subprocess_env


def serve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kawhi.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)


def taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_taken_http_port_is_one_line_before_the_model_loads() -> None:
    with taken_port() as sock:
        port = sock.getsockname()[1]
        run = serve("--port", str(port))
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert lines == [f"kawhi serve: cannot listen for HTTP on 127.0.0.1:{port}: Address already in use "
                     "(--port or KAWHI_PORT picks another)"], run.stderr[-2000:]


def test_a_taken_grpc_port_is_one_line_before_the_model_loads() -> None:
    with taken_port() as sock, socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        http_port, grpc_port = free.getsockname()[1], sock.getsockname()[1]
        free.close()
        run = serve("--port", str(http_port), "--grpc-port", str(grpc_port))
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[0].startswith(f"kawhi serve: cannot listen for gRPC on 127.0.0.1:{grpc_port}: Address already in use")


def test_a_model_that_does_not_load_ends_serve_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "not-a-vlm"
    model.mkdir()  # a folder that looks like a model (config.json) but is no supported one
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = serve("--model", str(model), "--port", str(port), "--log-json")
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kawhi serve: cannot load the model {model}: "), run.stderr[-2000:]
    assert "Traceback" not in run.stderr  # the traceback is a debug line; the reason is on one line
    logged = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    failure = [r for r in logged if r["msg"].startswith("model failed to load: ")]
    assert len(failure) == 1 and failure[0]["level"] == "error" and "exc" not in failure[0]
