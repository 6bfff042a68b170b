"""The prefix-sharing, MFU, wire, split-attention and gRPC-vs-HTTP benchmarks stay runnable (tiny sizes,
bench's ``demo`` kind, which is the embedded default model: ``Engine.load()`` and ``kawhi serve`` with no
--model, i.e. kawhi-tiny). Shapes of the results only, never timings."""

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


def run(*args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_prefix_share() -> None:
    out = run("bench.prefix_share", "--model", "demo", "--group", "2", "--tokens", "8", "--repeats", "1")
    for key in ("split_over_group", "split_over_distinct", "verl_per_sample_over_batched"):
        assert finite(out[key]), key
    assert out["server_per_mode"]["distinct"]["prefix_misses"] == 2  # nothing shared between images
    assert out["server_per_mode"]["split"]["prefix_misses"] == 1  # one prefix for the group's requests


def test_mfu_and_wire_and_split() -> None:
    mfu = run("bench.mfu", "--model", "demo", "--group", "2", "--tokens", "16", "--repeats", "1", "--matmul", "128")
    assert finite(mfu["forward_over_matmul_square"]) and finite(mfu["split_over_copy_time"])
    wire = run("bench.wire", "--model", "demo", "--groups", "2", "--group", "2", "--tokens", "32", "--repeats", "1")
    assert wire["wire"]["base64"]["bytes_per_token"] < wire["wire"]["float"]["bytes_per_token"]
    assert finite(wire["wire"]["base64"]["encode_decode_share_of_forward"])
    split = run("bench.split_attention", "--model", "demo", "--tokens", "16", "--group", "2", "--repeats", "1")
    assert split["max_abs_diff_hidden"] < 1e-3 and finite(split["time_ratio"])


def test_grpc_vs_http_serialisation_mode() -> None:
    """The serialisation mode runs the servers' own encode/decode code (no server) and the two
    transports' answers are equal to the last bit; shapes only, never the ratio."""
    out = run("bench.grpc_vs_http", "--serialise-only", "--groups", "1", "--responses", "2", "--tokens", "16",
              "--serialise-groups", "2", "--serialise-reps", "1")
    ser = out["serialisation"]
    assert ser["answers_equal"] is True and ser["groups"] == 2
    assert ser["bytes"]["grpc_answer"] < ser["bytes"]["http_answer"]
    assert all(finite(v) for v in ser["seconds"].values()) and finite(ser["totals"]["grpc_over_http"])
