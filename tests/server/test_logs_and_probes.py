"""Logs a person and a kubelet can live with: text on a terminal and JSON otherwise, probes
(/healthz, /health, /readyz, /metrics) logged at debug, not once per probe at info."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from kawhi.server.logs import JsonFormatter, TextFormatter, configure_logging
from server_fixtures import ROOT, ServerThread, subprocess_env


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _formatter() -> Any:
    return logging.getLogger().handlers[-1].formatter


def test_text_on_a_terminal_json_on_a_pipe_unless_told(monkeypatch: pytest.MonkeyPatch, root_logging: None) -> None:
    leader, follower = pty.openpty()  # a real terminal
    with os.fdopen(follower, "w") as tty, os.fdopen(os.dup(leader), "rb") as _:
        monkeypatch.setattr(sys, "stderr", tty)
        configure_logging("info", None)
        assert isinstance(_formatter(), TextFormatter)
        configure_logging("info", True)
        assert isinstance(_formatter(), JsonFormatter)
    os.close(leader)
    read, write = os.pipe()  # a log collector
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "stderr", pipe)
        configure_logging("info", None)
        assert isinstance(_formatter(), JsonFormatter)
        configure_logging("info", False)
        assert isinstance(_formatter(), TextFormatter)
    os.close(read)


def test_serve_help_says_what_log_json_unset_means() -> None:
    run = subprocess.run([sys.executable, "-m", "kawhi.cli", "serve", "--help"], capture_output=True, text=True,
                         env=subprocess_env(), cwd=ROOT, timeout=120)
    assert run.returncode == 0 and "--log-json" in run.stdout
    assert "text on a terminal, JSON otherwise" in " ".join(run.stdout.split())


def test_probes_are_not_logged_at_info_and_health_is_an_alias(caplog: pytest.LogCaptureFixture) -> None:
    with ServerThread() as s, s.client() as c, caplog.at_level(logging.INFO, logger="kawhi.server.access"):
        s.wait_ready()
        caplog.clear()
        for path in ("/healthz", "/health", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200, path
        assert c.get("/health").json() == c.get("/healthz").json()
        assert c.get("/v1/info").status_code == 200
    logged = [getattr(r, "path", None) for r in caplog.records
              if r.name == "kawhi.server.access" and r.levelno >= logging.INFO]
    assert logged == ["/v1/info"], logged
