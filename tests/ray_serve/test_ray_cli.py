"""``kawhi ray serve --address <cluster>``: a subprocess that joins a running Ray (started here,
small, as a verl team's cluster would be running), deploys one replica of kawhi-tiny,
answers over HTTP on the port it was given, and exits 0 on SIGTERM. A model that does not load
is one line and exit 1. Runs after test_ray_serve.py's cluster is gone (one Ray at a time on a
shared machine).

The command joins a cluster rather than starting its own: Ray gives a starting node a fixed 30 s
to register, which two loaded shared cores do not always meet; joining has no such wait."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="kawhi-rl[ray] is not installed")

from server_fixtures import b64, free_port, png_bytes, subprocess_env, wait_ready


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray (2 CPUs, no dashboard; its files under a short folder: socket paths must stay
    under 108 bytes); its GCS address."""
    import ray
    from ray import serve

    path = tempfile.mkdtemp(prefix="kr", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=path)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()  # the command started Serve's controller in the cluster; it outlives the command
        ray.shutdown()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_tmp(tmp_path: Path) -> Path:
    """Where the command's output goes."""
    return tmp_path


def kawhi_ray_serve(tmp: Path, *flags: str) -> subprocess.Popen:
    """The command, its output in files (Ray's own processes inherit them: an unread pipe would stall them)."""
    env = subprocess_env(RAY_DEDUP_LOGS="0")
    with open(tmp / "out", "w") as out, open(tmp / "err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "kawhi.cli", "ray", "serve", "--replicas", "1",
                                 "--torch-threads", "1", "--log-level", "warning", *flags],
                                env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, tmp: Path, timeout: float) -> tuple[str, str]:
    """Wait for the command (killed past ``timeout``); its stdout and stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (tmp / "out").read_text(), (tmp / "err").read_text()


def ready(proc: subprocess.Popen, tmp: Path, url: str, timeout: float) -> None:
    """Until ``url`` is ready; the command's stderr when it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kawhi ray serve exited {proc.returncode}: {(tmp / 'err').read_text()[-3000:]}")
        try:
            wait_ready(url, timeout=2)
            return
        except AssertionError:
            continue
    raise AssertionError(f"kawhi ray serve not ready after {timeout} s: {(tmp / 'err').read_text()[-3000:]}")


def test_kawhi_ray_serve_answers_over_http_and_stops_on_sigterm(cluster: str, ray_tmp: Path) -> None:
    from kawhi.engine.engine import TINY_MODEL_DIR

    port = free_port()
    proc = kawhi_ray_serve(ray_tmp, "--address", cluster, "--model", str(TINY_MODEL_DIR), "--port", str(port))
    try:
        ready(proc, ray_tmp, f"http://127.0.0.1:{port}", timeout=300)
        group = {"image": {"data": b64(png_bytes(56, 56))}, "prompt": "What is drawn?",
                 "responses": [{"text": "A square.\n\nYes.", "reward": 1.0}, {"text": "A line.", "reward": 0.0}]}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/reweight", json={"groups": [group]}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["results"][0]["responses"]) == 2
        deployed = time.monotonic() + 120  # the proxy answers before the command has seen the deploy finish
        while "replica(s) at" not in (ray_tmp / "out").read_text() and time.monotonic() < deployed:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc, ray_tmp, timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert f"1 replica(s) at http://127.0.0.1:{port} and ray://kawhi" in out


def test_a_model_that_does_not_load_is_one_line_and_exit_1(cluster: str, ray_tmp: Path) -> None:
    model = ray_tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a folder that is no model
    proc = kawhi_ray_serve(ray_tmp, "--address", cluster, "--model", str(model), "--app-name", "broken",
                           "--port", str(free_port()))
    out, err = finish(proc, ray_tmp, timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "kawhi ray serve: the application did not start" in err
    assert "Traceback" not in err.split("kawhi ray serve: the application did not start")[1]
