"""`kawhi` as people expect: one-line mistakes (exit 2), `-` for stdin/stdout, cached hub ids, `kawhi info`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import ROOT, subprocess_env

EXAMPLES = ROOT / "examples"
TINY = ROOT / "service" / "kawhi" / "models" / "tiny"


def kawhi(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kawhi.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=subprocess_env(**env), cwd=ROOT)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


MISTAKES = [
    (["reweight", "no-such-file.jsonl", "-o", "-"], "does not exist"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--model", str(EXAMPLES)], "not a model folder"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--model", "nobody/not-cached-model"],
     "not in the local Hugging Face cache"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--dtype", "foo"], "invalid choice"),
    (["--log-level", "loud", "info"], "invalid choice"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--temperature", "nan"], "--temperature"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--sguf-beta", "-1"], "--sguf-beta"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--seed", "-1"], "--seed"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "-", "--w-min", "-1", "--w-max", "-1"], "--w-min"),
    (["reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", "/no/such/dir/out.jsonl"], "cannot write"),
    (["serve", "--dtype", "foo"], "invalid choice"),
    (["serve", "--model", "/no/such/model"], "no such folder"),
    (["info", "--device", "cuda:7"], "CUDA"),
]


@pytest.mark.parametrize("args,needle", MISTAKES, ids=[" ".join(a)[:60] for a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    if args[:1] == ["info"] and _cuda():
        pytest.skip("CUDA is available here")
    run = kawhi(*args)
    assert run.returncode == 2, (run.returncode, run.stderr[-1500:])
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "kawhi: using"))]
    assert len(lines) == 1, run.stderr
    assert needle in lines[0] and "Traceback" not in run.stderr, run.stderr
    assert run.stdout == ""


def test_stdin_to_stdout_with_provenance() -> None:
    lines = (EXAMPLES / "rollouts.jsonl").read_text().splitlines()[:2]
    groups = [json.loads(line) for line in lines]
    for g in groups:  # paths are relative to the working folder when reading stdin
        g["image"]["path"] = str(EXAMPLES / g["image"]["path"])
    run = kawhi("reweight", "-", "-o", "-", "-q", "--sguf-beta", "0.2", "--estimator", "rloo",
                stdin="".join(json.dumps(g) + "\n" for g in groups))
    assert run.returncode == 0, run.stderr[-1500:]
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["id"] for r in out] == [g["id"] for g in groups]
    for r in out:
        assert "error" not in r and r["responses"]
        assert r["kawhi"]["options"]["sguf"]["beta"] == 0.2 and r["kawhi"]["options"]["estimator"] == "rloo"
        assert r["kawhi"]["model"] and r["kawhi"]["version"]


def test_a_cached_hub_id_loads_offline_and_info_prints_json(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--kawhi-test--tiny-vl" / "snapshots" / "0123456789abcdef"
    # a hub snapshot carries no embedded-model label (KAWHI_MODEL_CARD.json would name it kawhi-tiny)
    shutil.copytree(TINY, snapshot, ignore=shutil.ignore_patterns("KAWHI_*.json"))
    (cache / "models--kawhi-test--tiny-vl" / "refs").mkdir()
    (cache / "models--kawhi-test--tiny-vl" / "refs" / "main").write_text("0123456789abcdef")
    run = kawhi("info", "--model", "kawhi-test/tiny-vl", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr[-1500:]
    info = json.loads(run.stdout)
    assert info["model"] == "kawhi-test/tiny-vl" and not info["is_demo"]
    assert {"heads", "defaults", "limits", "version"} <= set(info)
    assert info["defaults"]["sguf"]["beta"] == 0.1
