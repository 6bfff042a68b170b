"""Start-up, loading, failure, SIGTERM draining, settings and the `serve` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from server_fixtures import (
    ROOT,
    ServerThread,
    assert_problem,
    example_groups,
    free_port,
    metric,
    png_bytes,
    small_group,
    subprocess_env,
    wait_ready,
)

# ====================================================================== loading / failed


def test_probes_answer_at_once_while_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real engine loads in the background; a gate holds the load so 'loading' is observable."""
    from kawhi.pipeline.service import ReweightService

    gate = threading.Event()
    real_load = ReweightService.load_engine

    def gated_load(self: ReweightService) -> Any:
        gate.wait(30)
        return real_load(self)

    monkeypatch.setattr(ReweightService, "load_engine", gated_load)
    with ServerThread(engine=None) as s, s.client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "phase": "loading", "version": c.get("/healthz").json()["version"]}
        ready = assert_problem(c.get("/readyz"), 503, "")
        assert ready["state"] == "loading"
        loading = assert_problem(c.post("/v1/reweight", json={"groups": [small_group(1)]}), 503, "")
        assert int(c.post("/v1/reweight", json={"groups": [small_group(1)]}).headers["retry-after"]) >= 1
        assert loading["type"].endswith("/loading")
        assert_problem(c.get("/v1/info"), 503, "")
        # uploads need no model: they work while it loads
        assert c.post("/v1/images", content=png_bytes(), headers={"content-type": "image/png"}).status_code == 200
        assert metric(c.get("/metrics").text, "kawhi_engine_ready") == 0
        gate.set()
        s.wait_ready()
        assert c.post("/v1/reweight", json={"groups": [small_group(1)]}).status_code == 200
        assert metric(c.get("/metrics").text, "kawhi_engine_ready") == 1


def test_a_model_that_fails_to_load_is_reported(tmp_path: Any) -> None:
    with ServerThread(engine=None, model=str(tmp_path / "no-such-model")) as s, s.client() as c:
        deadline = time.monotonic() + 30
        while s.state.phase == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/healthz").status_code == 200
        body = assert_problem(c.get("/readyz"), 503, "")
        assert body["state"] == "failed" and "failed to load" in body["reasons"][0]
        assert_problem(c.post("/v1/reweight", json={"groups": [small_group(1)]}), 503, "")


# ====================================================================== SIGTERM


def test_sigterm_drains_in_flight_work_then_exits_zero() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kawhi.serve", "--port", str(port), "--drain-timeout-s", "60",
         "--log-level", "info"],
        cwd=ROOT,
        env=subprocess_env(KAWHI_API_KEYS="secret-key-1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer secret-key-1"}
    try:
        wait_ready(url, timeout=120)
        groups = []
        for i in range(16):  # heavy enough to still be running when the signal lands
            g = example_groups()[i % 3]
            g["id"] = f"drain-{i}"
            groups.append(g)
        answer: dict[str, Any] = {}

        def heavy() -> None:
            try:
                answer["r"] = httpx.post(url + "/v1/reweight", json={"groups": groups}, headers=auth, timeout=120)
            except Exception as exc:  # reported below
                answer["exc"] = exc

        t = threading.Thread(target=heavy)
        t.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(url + "/metrics").text, "kawhi_queue_depth") == 0:  # admitted, not yet done
            assert time.monotonic() < deadline and t.is_alive(), "the heavy request never showed up in the queue"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        # draining: the listener stays open, readiness fails and new work is refused with a retry hint
        deadline = time.monotonic() + 10
        while (ready := httpx.get(url + "/readyz")).status_code == 200:  # the handler runs within a loop tick
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert assert_problem(ready, 503, "")["state"] == "draining"
        refused = httpx.post(url + "/v1/reweight", json={"groups": [small_group(9)]}, headers=auth)
        assert_problem(refused, 503, "")
        assert refused.json()["type"].endswith("/draining") and int(refused.headers["retry-after"]) >= 1
        t.join(120)
        assert "exc" not in answer, answer.get("exc")
        r = answer["r"]
        assert r.status_code == 200, r.text[:500]
        assert [g["id"] for g in r.json()["results"]] == [g["id"] for g in groups]
        assert all(g["error"] is None for g in r.json()["results"])
        code = proc.wait(60)
        out = proc.stdout.read() if proc.stdout else ""
        assert code == 0, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    msgs = [line["msg"] for line in lines]
    assert "drained" in msgs and "stopped" in msgs
    # settings printed once at start-up, API keys redacted; structured request logs with ids
    settings_lines = [line for line in lines if line["msg"] == "settings"]
    assert len(settings_lines) == 1
    assert "secret-key-1" not in out
    assert settings_lines[0]["settings"]["api_keys"] == "<1 key(s) redacted>"
    assert settings_lines[0]["settings"]["temperature"] == 0.1
    access = [line for line in lines if line["msg"] == "request" and line.get("route") == "/v1/reweight"]
    assert access and all(len(line["request_id"]) == 32 for line in access)


# ====================================================================== settings and CLI


def test_every_method_default_is_a_setting_and_a_flag() -> None:
    from kawhi.engine.config import MethodConfig, SgufParams
    from kawhi.serve import add_serve_parser
    from kawhi.settings import Settings

    parser = argparse.ArgumentParser()
    serve = add_serve_parser(parser.add_subparsers())
    flags = {a.option_strings[0] for a in serve._actions if a.option_strings}
    for f in dataclasses.fields(MethodConfig):
        if f.name == "sguf":
            continue
        assert f.name in Settings.model_fields, f.name
        assert "--" + f.name.replace("_", "-") in flags, f.name
    for f in dataclasses.fields(SgufParams):
        assert "--sguf-" + f.name.replace("_", "-") in flags
    assert Settings().method_config() == MethodConfig()
    for flag in ("--model", "--device", "--dtype", "--host", "--port", "--batch-tokens", "--queue-groups",
                 "--max-body-bytes", "--redis-url", "--api-keys"):
        assert flag in flags


def test_settings_precedence_flag_over_env_over_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from kawhi.serve import add_serve_parser, settings_from_args
    from kawhi.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="WARNING")  # as the kawhi CLI has: must not leak into serve
    add_serve_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("KAWHI_TEMPERATURE", "0.5")
    monkeypatch.setenv("KAWHI_PORT", "9100")
    monkeypatch.setenv("KAWHI_HEADS", "0,2")
    monkeypatch.setenv("KAWHI_LOG_LEVEL", "debug")
    monkeypatch.setenv("KAWHI_API_KEYS", "a, b ,")
    s = settings_from_args(parser.parse_args(["serve", "--temperature", "0.25", "--sguf-beta", "0.2"]))
    assert s.temperature == 0.25  # flag
    assert s.port == 9100  # env
    assert s.log_level == "debug"  # env, not the parent parser's default
    assert s.host == "127.0.0.1" and s.batch_tokens == Settings.model_fields["batch_tokens"].default  # defaults
    cfg = s.method_config()
    assert cfg.heads == (0, 2) and cfg.temperature == 0.25 and cfg.sguf.beta == 0.2
    assert s.api_key_list() == [b"a", b"b"]
    assert "a, b" not in json.dumps(s.redacted()) and s.redacted()["api_keys"] == "<2 key(s) redacted>"
    monkeypatch.setenv("KAWHI_W_MIN", "3")
    with pytest.raises(Exception, match="w_min"):
        Settings()


def test_kawhi_serve_help_lists_the_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "kawhi.serve", "--help"], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--port", "--temperature", "--skip-ratio", "--redis-url", "KAWHI_BATCH_TOKENS"):
        assert flag in out.stdout
