"""The embedded demo model: shipped, reproducible from its script, offline, labelled.

The demo itself is under test here, so these are the tests that keep it (docs/tiny.md, done-when checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kawhi.engine.engine import DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


# Stamps the writer adds that say which library version wrote the file, not what the model is:
# the installed transformers (unpinned, so the resolver's version of the day) writes its own.
VERSION_STAMPS = {"transformers_version"}


def _content(path: Path) -> object:
    """What a shipped file means: the tensors of a safetensors file, the JSON without version stamps."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {name: tensor.tolist() for name, tensor in sorted(load_file(path).items())}
    return _without_stamps(json.loads(path.read_text()))


def _without_stamps(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_stamps(v) for k, v in value.items() if k not in VERSION_STAMPS}
    if isinstance(value, list):
        return [_without_stamps(v) for v in value]
    return value


def test_build_script_regenerates_the_shipped_files(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_model.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert _content(tmp_path / name) == _content(DEMO_MODEL_DIR / name), name


def test_the_regeneration_check_still_sees_a_changed_weight_or_setting(tmp_path):
    """The comparison drops only version stamps: one changed number in either file is still a difference."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(DEMO_MODEL_DIR / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += torch.tensor(1e-3, dtype=tensors[name].dtype)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert _content(tmp_path / "model.safetensors") != _content(DEMO_MODEL_DIR / "model.safetensors")
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}))
    assert _content(tmp_path / "config.json") == _content(DEMO_MODEL_DIR / "config.json")
    config["text_config"] = {**config.get("text_config", {}), "num_attention_heads": 99}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _content(tmp_path / "config.json") != _content(DEMO_MODEL_DIR / "config.json")


def test_demo_is_small_and_labelled():
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size < 3_000_000
    label = json.loads((DEMO_MODEL_DIR / "KAWHI_DEMO.json").read_text())
    assert label["demo"] is True and "never train" in label["note"]


@pytest.mark.parametrize(("model", "is_demo", "log"), [("DEMO_MODEL_DIR", "True", "DEMO"), ("None", "False", "")])
def test_embedded_models_load_with_the_hub_switched_off(model, is_demo, log):
    """The demo (as --model) and the default kawhi-tiny (no --model) load offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    code = (f"from kawhi.engine.engine import DEMO_MODEL_DIR, Engine; from kawhi.pipeline.local import LocalService; "
            f"e = Engine.load({model}); "
            "r = LocalService(e).reweight([{'image': {'path': 'examples/images/triangle.png'}, 'prompt': 'p', "
            "'responses': [{'text': 'a\\n\\nb', 'reward': 1.0}, {'text': 'c', 'reward': 0.0}]}]); "
            "assert r[0].error is None, r[0].error; print(e.info()['is_demo'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == is_demo
    assert log in run.stderr
