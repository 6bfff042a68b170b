"""The benchmark harness stays runnable: one tiny pass of every suite on the embedded default model
(bench's `demo` kind: Engine.load(), i.e. kawhi-tiny).

Asserts the shape of the results (fields, finite positive numbers, no failed request),
never a timing: timings belong to bench/README.md, not to CI.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return last, json.loads(out.read_text()), out


def test_last_line_has_the_ratios(tiny_run: tuple[dict, dict, Path]) -> None:
    last, _, out = tiny_run
    for key in ("p1_ratio", "p2_speedup", "p2_memory_ratio", "p3_cost_ratio"):
        assert _positive(last[key]), key
    assert set(last["met"]) == {"p1_ratio", "p2_speedup", "p2_memory_ratio", "p3_cost_ratio"}
    assert last["json"] == str(out)
    assert last["load_errors_other_than_429"] == 0


def test_results_json_fields(tiny_run: tuple[dict, dict, Path]) -> None:
    _, results, _ = tiny_run
    meta = results["meta"]
    for key in ("command", "machine", "loadavg_start", "loadavg_end", "sizes", "seconds"):
        assert key in meta
    assert meta["machine"]["torch"] and meta["machine"]["cpu_count"] >= 1
    assert results["model"]["layers"] >= 1 and results["model"]["params"] > 0

    p1 = results["p1"]
    assert _positive(p1["ratio"]) and _positive(p1["bare"]["median_s"]) and _positive(p1["http"]["median_s"])
    assert p1["workload"]["sequence_tokens"] > 0 and "command" in p1["server"]

    p2 = results["p2"]
    for method in ("kawhi", "naive", "bare"):
        assert _positive(p2["time"][method]["median_s"]) and _positive(p2["time"][method]["gflop_per_s"])
    for method in ("kawhi", "naive"):
        assert p2["memory"][method]["delta_mib"] >= 0 and p2["memory"][method]["rss_method"]
    assert _positive(p2["speedup"]) and _positive(p2["memory_ratio"])

    p3 = results["p3"]
    assert _positive(p3["cost_ratio"]) and 0 < p3["token_ratio"] < 1
    assert p3["workload"]["group_size"] == 5

    for curve in ("length", "group", "image"):
        points = results["scaling"][curve]
        assert len(points) >= 2
        for point in points:
            assert _positive(point["time"]["kawhi"]["median_s"]) and _positive(point["time"]["bare"]["median_s"])
    assert "naive" in results["scaling"]["length"][0]["time"]

    load = results["load"]
    assert load["errors_other_than_429"] == 0
    assert load["statuses"].get("200", 0) >= 1
    for key in ("p50_s", "p95_s", "p99_s"):
        assert _positive(load["latency"][key])


def test_plot_written(tiny_run: tuple[dict, dict, Path]) -> None:
    pytest.importorskip("matplotlib")
    last, results, out = tiny_run
    png = Path(last["png"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
