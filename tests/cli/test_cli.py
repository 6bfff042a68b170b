"""`kawhi reweight` as a user runs it: the installed console script on real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def kawhi(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    executable = shutil.which("kawhi")
    command = [executable] if executable else [sys.executable, "-m", "kawhi.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("examples", ["rollouts.jsonl", "tiny_rollouts.jsonl"])
def test_reweight_examples(tmp_path, examples):
    out = tmp_path / "out.jsonl"
    run = kawhi("reweight", str(EXAMPLES / examples), "-o", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    announced = [line for line in run.stderr.splitlines() if "DEMO" in line or "head set" in line]
    assert announced == [], run.stderr  # no --model: kawhi-tiny, trained and with its heads file
    # the demo's own warning is under test: the random demo, asked for, is announced once, not three times
    if examples == "rollouts.jsonl":
        demo = kawhi("reweight", str(EXAMPLES / examples), "-o", str(tmp_path / "demo.jsonl"), "--quiet",
                     "--model", str(ROOT / "service" / "kawhi" / "models" / "demo"))
        assert demo.returncode == 0, demo.stderr
        demo_lines = [line for line in demo.stderr.splitlines() if "DEMO" in line or "head set" in line]
        assert len(demo_lines) == 1, demo.stderr
    inputs = read_jsonl(EXAMPLES / examples)
    results = read_jsonl(out)
    assert [r["id"] for r in results] == [g["id"] for g in inputs]
    for group, result in zip(inputs, results):
        assert "error" not in result
        assert result["kawhi"]["model"] == "kawhi-tiny-qwen2.5-vl"
        assert len(result["grid"]) == 2 and result["selected_tokens"]
        assert len(result["responses"]) == len(group["responses"])
        for response in result["responses"]:
            assert len(response["token_advantages"]) == len(response["token_weights"]) > 0
            assert response["paragraphs"][-1]["token_end"] == len(response["token_weights"])


def test_bad_lines_become_error_records_and_the_run_continues(tmp_path):
    good = (EXAMPLES / "rollouts.jsonl").read_text().splitlines()[0]
    bad_reward = json.loads(good)
    bad_reward["id"] = "nan-reward"
    bad_reward["responses"][1]["reward"] = float("nan")
    missing_image = json.loads(good)
    missing_image["id"] = "missing-image"
    missing_image["image"] = {"path": "images/nope.png"}
    lines = [good, "{not json", json.dumps(bad_reward), json.dumps({"id": "no-responses", "image": {"path": "x"},
                                                                   "prompt": "p", "responses": []}),
             json.dumps(missing_image), good]
    shutil.copytree(EXAMPLES / "images", tmp_path / "images")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    run = kawhi("reweight", str(src), "-o", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    results = read_jsonl(out)
    assert len(results) == len(lines)
    assert ["error" in r for r in results] == [False, True, True, True, True, False]
    assert results[1]["line"] == 2
    assert results[2]["error"]["pointer"] == "/responses/1/reward"
    assert results[3]["error"]["pointer"] == "/responses"
    assert results[4]["error"]["pointer"] == "/image/path" and results[4]["error"]["status"] == 404
    assert results[0]["responses"] == results[5]["responses"]


def test_exit_status_is_nonzero_only_when_nothing_was_processed(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{broken\n[]\n")
    run = kawhi("reweight", str(src), "-o", str(tmp_path / "out.jsonl"), "--quiet")
    assert run.returncode == 1
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2


def test_method_flags_reach_the_engine(tmp_path):
    out_default, out_flags = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    src = str(EXAMPLES / "rollouts.jsonl")
    assert kawhi("reweight", src, "-o", str(out_default), "-q").returncode == 0
    run = kawhi("reweight", src, "-o", str(out_flags), "-q", "--normalize", "mean", "--regions", "all",
                "--heads", "0,1", "--w-min", "0.2")
    assert run.returncode == 0, run.stderr
    a, b = read_jsonl(out_default)[0], read_jsonl(out_flags)[0]
    assert b["selected_tokens"] == list(range(b["grid"][0] * b["grid"][1]))
    assert a["responses"][0]["token_weights"] != b["responses"][0]["token_weights"]


def test_invalid_option_is_a_clear_usage_error(tmp_path):
    run = kawhi("reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--heads", "99")
    assert run.returncode == 2
    assert "--heads" in run.stderr
    run = kawhi("reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--regions", "nope")
    assert run.returncode == 2
