"""The integration examples stay runnable: examples/trl_grpo.py trains a step (demo policy,
in-process KAWHI) and the KAWHI overrides of examples/verl/run_qwen2_5_vl_grpo_kawhi_legacy.sh
compose with verl's own Hydra config and resolve to the KAWHI classes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from test_integration_helpers import ROOT

TRL_EXAMPLE = ROOT / "examples" / "trl_grpo.py"
VERL_LAUNCHER = ROOT / "examples" / "verl" / "run_qwen2_5_vl_grpo_kawhi_legacy.sh"


def test_trl_example_marks_exactly_three_kawhi_lines() -> None:
    lines = [line for line in TRL_EXAMPLE.read_text().splitlines() if re.search(r"# KAWHI \(\d/3\)", line)]
    assert len(lines) == 3
    assert "from kawhi_client.integrations.trl import KawhiGRPOTrainer" in lines[0]
    assert "KawhiGRPOTrainer(" in lines[1] and "trainer.train()" in lines[2]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
def test_trl_example_runs_a_demo_step(tmp_path: Any) -> None:
    # the example's own --demo smoke mode runs here: it loads the demo as policy and reference (examples/trl_grpo.py)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(TRL_EXAMPLE), "--demo", "--max-steps", "1",
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["global_step"] == 1
    assert summary["kawhi"]["reweighted_rows"] >= 1 and summary["kawhi"]["fallbacks"] == 0


def launcher_kawhi_overrides(url: str) -> list[str]:
    """The override tokens of the launcher lines marked KAWHI, with the shell variables filled in."""
    out = []
    for line in VERL_LAUNCHER.read_text().splitlines():
        if "# KAWHI" not in line:
            continue
        token = line.strip().split(" `#", 1)[0].strip()
        token = token.replace('"$KAWHI_URL"', url).replace('"$KAWHI_ON_ERROR"', "fallback")
        out.append(token)
    return out


@pytest.mark.skipif(importlib.util.find_spec("verl") is None or importlib.util.find_spec("hydra") is None,
                    reason="verl not installed: see examples/verl/install_cpu_test_env.sh")
def test_verl_launcher_overrides_compose_with_verls_config_and_resolve_to_kawhi() -> None:
    import verl
    from hydra import compose, initialize_config_dir
    from kawhi_client.integrations import HttpBackend
    from kawhi_client.integrations import verl as kv
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    overrides = launcher_kawhi_overrides("http://kawhi.example:8000")
    assert len(overrides) == 8, overrides
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    assert config.trainer.use_v1 is False
    assert core_algos.get_adv_estimator_fn(config.algorithm.adv_estimator) is kv.compute_grpo_kawhi_advantage
    assert resolve_reward_manager_cls(config) is kv.KawhiRewardManager
    settings = kv.kawhi_settings(config)
    assert (settings["url"], settings["on_error"], settings["inner"]) == ("http://kawhi.example:8000", "fallback", "naive")
    reweighter = kv.reweighter_from_config(config)
    assert isinstance(reweighter.backend, HttpBackend) and reweighter.on_error == "fallback"
    assert reweighter.backend.client.base_url.startswith("http://kawhi.example:8000")
