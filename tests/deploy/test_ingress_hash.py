"""Affinity for trainers that cannot use the SDK's replica support: a real NGINX in front of
three `kawhi serve` replicas, hashing on the routing key header (what the NGINX Ingress
annotation ``upstream-hash-by: "$http_x_kawhi_routing_key"`` configures), and a client that
only knows the one NGINX address. Each group stays on one replica; a killed replica loses
no request (NGINX tries the next upstream, the client retries what is left).

NGINX comes from scripts/install_deploy_tools.sh (.tools/bin/nginx), $KAWHI_TEST_NGINX or
PATH; without it the test skips, loudly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]

from bench.replicas import replicas, run, workload  # noqa: E402
from bench.server import free_port  # noqa: E402

pytestmark = pytest.mark.slow

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    upstream kawhi {{
        hash $http_x_kawhi_routing_key consistent;
        {servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://kawhi;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_503 non_idempotent;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    for candidate in (os.environ.get("KAWHI_TEST_NGINX"), str(ROOT / ".tools" / "bin" / "nginx"),
                      shutil.which("nginx")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("NGINX MISSING: run `bash scripts/install_deploy_tools.sh` (or set KAWHI_TEST_NGINX)")


def test_an_nginx_hashing_on_the_header_keeps_groups_together(tmp_path: Path) -> None:
    binary = nginx_binary()
    with replicas(3) as servers:
        port = free_port()
        conf = tmp_path / "nginx.conf"
        conf.write_text(NGINX_CONF.format(
            tmp=tmp_path, port=port,
            servers="\n        ".join(f"server {s.url.removeprefix('http://')} max_fails=1 fail_timeout=5s;"
                                      for s in servers)))
        proc = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "nginx did not come up"
                time.sleep(0.2)

            out = run(servers, workload(12, 3, tag="nginx-"), mode="front", front=url, in_flight=4)
            assert out["lost"] == 0, out["errors"]
            assert out["group_starts"] == 12  # each group on one replica only
            assert out["prefixes_computed"] == 12
            assert sum(1 for n in out["groups_per_replica"].values() if n) >= 2  # and they spread
            assert out["uploads"] == 12  # uploads carry their group's key: no image landed elsewhere

            out = run(servers, workload(12, 3, tag="nginx-kill-"), mode="front", front=url, in_flight=4,
                      kill_after=1 / 3)
            assert out["lost"] == 0 and out["answered"] == 36, out["errors"]
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()
