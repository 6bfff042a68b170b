"""The machine a benchmark ran on, its load average, and waiting for a quiet one (bench/run.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

from bench.measure import REPO


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        # uncommitted changes to the code being measured (service/) make the commit alone not enough
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.split("\n")
        dirty = sorted(line[3:] for line in dirty if line.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, []
    out = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git_commit": commit,
        "uncommitted_service_files": dirty,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return out


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def wait_for_quiet(threshold: float, max_s: float) -> float:
    """Sleep until the 1-minute load average is below ``threshold`` (bounded by ``max_s``)."""
    t0 = time.monotonic()
    while True:
        now = loadavg()
        if now is None or now[0] < threshold:
            return time.monotonic() - t0
        if time.monotonic() - t0 > max_s:
            _log(f"load average still {now} after {max_s:.0f} s; starting anyway")
            return time.monotonic() - t0
        _log(f"load average {now}: waiting for < {threshold}")
        time.sleep(15)
