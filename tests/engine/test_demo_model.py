"""The embedded demo model: shipped, reproducible from its script, offline, labelled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kawhi.engine.engine import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_build_script_regenerates_the_shipped_files(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_model.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (tmp_path / name).read_bytes() == (DEMO_MODEL_DIR / name).read_bytes(), name


def test_demo_is_small_and_labelled():
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size < 3_000_000
    label = json.loads((DEMO_MODEL_DIR / "KAWHI_DEMO.json").read_text())
    assert label["demo"] is True and "never train" in label["note"]


def test_demo_loads_with_the_hub_switched_off():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    code = ("from kawhi.engine.engine import Engine; from kawhi.pipeline.local import LocalService; e = Engine.load(); "
            "r = LocalService(e).reweight([{'image': {'path': 'examples/images/triangle.png'}, 'prompt': 'p', "
            "'responses': [{'text': 'a\\n\\nb', 'reward': 1.0}, {'text': 'c', 'reward': 0.0}]}]); "
            "assert r[0].error is None, r[0].error; print(e.info()['is_demo'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert "DEMO" in run.stderr
