"""Timing and peak-memory measurement.

Timing: wall clock (``time.perf_counter``; on CUDA after ``torch.cuda.synchronize``), one
warm-up call per method, then ``repeats`` calls. When several methods are compared they
are *interleaved* (A B C A B C ...), so a burst of load from another process hits all of
them alike; each reports the median and the min of its calls.

Peak memory on CPU: ``tracemalloc`` does not see torch's allocations, so each
measurement runs in a fresh subprocess (``python -m bench.worker``) that loads the
model, prepares the inputs and warms the kernels up on a tiny group; then it resets the
kernel's high-water mark of resident memory (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0),
reads VmRSS as the baseline, runs the method once, and reads VmHWM (peak resident set
size). peak delta = VmHWM - baseline: the memory the computation itself needed, model
weights excluded. Where clear_refs is not writable it falls back to
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (after the warm-up) and says so
(``"rss_method"``); that fallback is an upper bound if loading peaked higher.
On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in-process.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": [round(s, 6) for s in samples]}


def compare(fns: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
            device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Interleaved timing of several zero-argument callables: {name: summary}."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: summary(s) for name, s in samples.items()}


# ---------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_delta(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run fn once; the peak resident memory it added over the current RSS, in MiB."""
    import gc

    gc.collect()
    exact = reset_peak_rss()
    baseline_kb = _status_kb("VmRSS")
    before_max_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    if exact:
        peak_kb = _status_kb("VmHWM")
        method = "VmHWM after clear_refs=5 (exact)"
    else:
        peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, baseline_kb)
        method = "ru_maxrss (upper bound: clear_refs unavailable)"
        if peak_kb <= before_max_kb:
            method += "; did not exceed the loading peak"
    return {"baseline_mib": baseline_kb / 1024, "peak_mib": peak_kb / 1024,
            "delta_mib": (peak_kb - baseline_kb) / 1024, "seconds": seconds, "rss_method": method}


def cuda_peak_delta(fn: Callable[[], Any]) -> dict[str, Any]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    mib = 1024 * 1024
    return {"baseline_mib": baseline / mib, "peak_mib": peak / mib, "delta_mib": (peak - baseline) / mib,
            "seconds": seconds, "rss_method": "torch.cuda.max_memory_allocated"}


def memory_in_subprocess(spec: Mapping[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Run ``python -m bench.worker SPEC`` and return its JSON (the last stdout line)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench.worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])
