#!/usr/bin/env python3
"""Smoke test of a built kawhi image, without a container runtime.

    sudo python3 scripts/smoke_image.py [IMAGE] [--json OUT.json]

IMAGE defaults to the tag scripts/build_image.sh gives the CPU image
(ghcr.io/kawhi/kawhi:<version>-cpu).  Needs root (mount, chroot) and podman.

What it does, as a container runtime would, but with `chroot` (these machines'
runtime refuses to start containers):

1. reads the image's config (`podman image inspect`): Env, User, WorkingDir,
   Entrypoint + Cmd, Healthcheck;
2. mounts the image (`podman image mount`), bind-mounts that tree read-only on a
   private folder (like the chart's readOnlyRootFilesystem) and adds /proc, /dev,
   /sys and an empty tmpfs on /tmp (the chart's emptyDir);
3. starts the entry point under `chroot --userspec=<image user>`, with exactly the
   image's environment plus KAWHI_HOST=127.0.0.1 and KAWHI_PORT=<a free port> (the
   port an operator would publish), in the image's working directory;
4. waits for /readyz, runs the image's own HEALTHCHECK command the same way,
   checks /v1/info and one POST /v1/reweight of an example group for the demo-model
   labelling, then stops the server by its PID with the image's STOPSIGNAL and
   expects a clean exit (SIGTERM drains);
5. unmounts everything, and prints image size, start-up time and request time.

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_NAME = "kawhi-tiny-qwen2.5-vl"  # service/kawhi/engine/engine.py: the default with no KAWHI_MODEL
EXPECTED_UID = 10001  # the chart's runAsUser (helm/kawhi/values.yaml)


def log(msg: str) -> None:
    print(f"[smoke-image] {msg}", flush=True)


class SmokeFailure(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SmokeFailure(what)
    log(f"ok: {what}")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def default_image() -> str:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return f"ghcr.io/kawhi/kawhi:{version}-cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- the image's filesystem


@contextlib.contextmanager
def image_root(image: str) -> Iterator[Path]:
    """The image's tree, read-only, with /proc, /dev, /sys and a fresh tmpfs /tmp."""
    merged = sh("podman", "image", "mount", image)
    root = Path(tempfile.mkdtemp(prefix="kawhi-smoke-root."))
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "--bind", merged, str(root)], check=True)
        mounted.append(root)
        # private first: mounts added below must not propagate into podman's own mount
        subprocess.run(["mount", "--make-rprivate", str(root)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root)], check=True)
        for args, target in (
            (["-t", "proc", "proc"], "proc"),
            (["--bind", "/dev"], "dev"),
            (["--rbind", "/sys"], "sys"),
            (["-t", "tmpfs", "-o", "mode=1777,size=2g", "tmpfs"], "tmp"),
        ):
            subprocess.run(["mount", *args, str(root / target)], check=True)
            mounted.append(root / target)
        yield root
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", str(path)], check=False)
        with contextlib.suppress(OSError):
            root.rmdir()
        subprocess.run(["podman", "image", "unmount", image], check=False, capture_output=True)


def chroot_cmd(root: Path, config: dict[str, Any], env: dict[str, str], argv: list[str]) -> list[str]:
    """`chroot` as the image's user, into its working directory, with exactly `env`."""
    user = config.get("User") or "0:0"
    uid, _, gid = user.partition(":")
    return [
        "chroot", f"--userspec={uid}:{gid or uid}", "--groups=", str(root),
        "/usr/bin/env", "-i", "-C", config.get("WorkingDir") or "/",
        *(f"{k}={v}" for k, v in env.items()), *argv,
    ]


# ---------------------------------------------------------------------- HTTP


def http(method: str, url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def example_request() -> dict[str, Any]:
    """The first example group of examples/rollouts.jsonl, its image inlined."""
    line = next(row for row in (ROOT / "examples" / "rollouts.jsonl").read_text().splitlines() if row.strip())
    group = json.loads(line)
    image = ROOT / "examples" / group["image"]["path"]
    group["image"] = {"data": base64.b64encode(image.read_bytes()).decode()}
    return {"groups": [group]}


# ---------------------------------------------------------------------- the test


def smoke(image: str, ready_timeout: float, result: dict[str, Any]) -> None:
    """Run every check; measurements and the server's log tail go into `result`."""
    info = json.loads(sh("podman", "image", "inspect", image))[0]
    config = info["Config"]
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    result.update(image=image, size_bytes=info["Size"])
    log(f"{image}: {info['Size'] / 1e6:.0f} MB, user {config.get('User')}, workdir {config.get('WorkingDir')}, "
        f"command {argv}")
    user = (config.get("User") or "0").split(":")[0]
    check(user == str(EXPECTED_UID), f"the image runs as uid {EXPECTED_UID} (non-root, the chart's runAsUser)")
    check("KAWHI_MODEL" not in env, "no KAWHI_MODEL in the image: the embedded kawhi-tiny is the default")
    healthcheck = (info.get("Healthcheck") or {}).get("Test") or []
    check(healthcheck[:1] == ["CMD"], "the image carries its HEALTHCHECK (docker format)")

    port = free_port()
    run_env = {**env, "KAWHI_HOST": "127.0.0.1", "KAWHI_PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    stop_signal = getattr(signal, config.get("StopSignal") or "SIGTERM")

    with image_root(image) as root, tempfile.TemporaryFile("w+") as out:
        workdir = root / (config.get("WorkingDir") or "/").lstrip("/")
        check(workdir.is_dir() and workdir.stat().st_uid == int(user), f"the working directory {workdir.name} "
              "exists and belongs to the image's user")
        check((root / "models").is_dir(), "/models exists (the chart's and compose's mount point for weights)")
        check((root / "etc" / "passwd").read_text().count(f":{user}:") >= 1, f"uid {user} is in /etc/passwd")

        started = time.monotonic()
        proc = subprocess.Popen(chroot_cmd(root, config, run_env, argv), stdout=out, stderr=subprocess.STDOUT)
        try:
            status, ready = None, None
            while time.monotonic() - started < ready_timeout:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    status, ready = http("GET", base + "/readyz", timeout=2)
                    if status == 200:
                        break
                time.sleep(0.2)
            result["startup_s"] = round(time.monotonic() - started, 2)
            check(proc.poll() is None, "the entry point is running")
            check(status == 200, f"/readyz answers 200 (after {result['startup_s']} s)")

            status_line = (Path(f"/proc/{proc.pid}/status").read_text())
            uids = re.search(r"^Uid:\s+(\d+)", status_line, re.M).group(1)
            check(uids == user, f"the server process (pid {proc.pid}) runs as uid {uids}")

            hc = subprocess.run(chroot_cmd(root, config, run_env, healthcheck[1:]), capture_output=True, text=True,
                                timeout=30)
            check(hc.returncode == 0, "the image's HEALTHCHECK command passes" + (f": {hc.stderr[-500:]}" if hc.returncode else ""))

            out.seek(0)
            status, body = http("GET", base + "/v1/info")
            check(status == 200 and body.get("is_demo") is False and body.get("model") == TINY_MODEL_NAME
                  and bool((body.get("model_card") or {}).get("val_accuracy")),
                  f"/v1/info names the embedded kawhi-tiny with its card ({body.get('model')}, "
                  f"is_demo={body.get('is_demo')})")

            request = example_request()
            t0 = time.monotonic()
            status, body = http("POST", base + "/v1/reweight", request, timeout=300)
            result["reweight_s"] = round(time.monotonic() - t0, 2)
            check(status == 200, f"POST /v1/reweight answers 200 (in {result['reweight_s']} s): "
                  + (json.dumps(body)[:300] if status != 200 else "ok"))
            check(body["model"] == TINY_MODEL_NAME, f"the reweight response names kawhi-tiny ({body['model']})")
            responses = body["results"][0]["responses"]
            n = len(request["groups"][0]["responses"])
            check(len(responses) == n and all(math.isfinite(r["advantage"]) and r["paragraphs"] for r in responses),
                  f"{n} responses reweighted, each with paragraphs and a finite advantage")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, stop_signal)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            result["log_tail"] = out.read()[-3000:]
        check(proc.returncode == 0, f"stopped by pid with {stop_signal.name}: drained and exited 0 "
              f"(got {proc.returncode})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", default=default_image())
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for /readyz")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--server-log", type=Path, help="write the server's output (last 3000 characters) here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("ERROR: needs root (podman image mount, mount, chroot)")
        return 2
    # a CI timeout's SIGTERM unwinds through the finally blocks: server stopped, mounts undone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] = {}
    try:
        smoke(args.image, args.ready_timeout, result)
    except (SmokeFailure, subprocess.CalledProcessError, KeyError, ValueError) as exc:
        if result.get("log_tail"):
            log("the server's output (last 3000 characters):\n" + result["log_tail"])
        log(f"FAILED: {exc}")
        return 1
    finally:
        if args.server_log:
            args.server_log.write_text(result.get("log_tail", ""))
    log(f"PASSED: {result['image']} size {result['size_bytes'] / 1e6:.0f} MB, start-up to /readyz "
        f"{result['startup_s']} s, one reweight {result['reweight_s']} s")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
