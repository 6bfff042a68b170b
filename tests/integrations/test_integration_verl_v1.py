"""verl's v1 trainer with KAWHI, against verl 0.9.1's real code on CPU (run in the side venv
by scripts/test_verl.sh; skipped where verl is absent).

Real: Ray actors (verl's agent-loop workers, reward-loop workers, TransferQueue storage and
controller), verl's config (its own Hydra ``ppo_trainer``), its loaders
(``load_class_from_fqn`` for the agent-loop manager, ``get_trainer_cls`` in a fresh Ray
process that only ran the setup hook), its single-turn agent loop building the prompt with
kawhi-tiny's processor, its reward loop scoring with a custom reward function, its
TransferQueue, and the trainer's own ``_compute_advantage`` / ``_compute_ref_log_prob``
(verl's GRPO, then KAWHI's scaling). A live ``kawhi serve`` (kawhi-tiny) answers.

Stand-ins: the processor's video part (torchvision, which would pull another torch; the
agent loop, verl's ``SingleTurnAgentLoop``, gets the image-only kawhi-tiny processor through
verl's ``agent_loop_config_path``), and, because they need a GPU, the rollout engine (``ScriptedLLM`` answers verl's
``LLMServerClient.generate`` with scripted token ids) and the actor's forward that writes
``old_log_probs`` (this test writes zeros there: GRPO does not read them). The trainer object
is built without ``init()`` (which starts the GPU worker groups); its methods under test
are called as ``fit`` calls them, on a ``KVBatchMeta`` of the real TransferQueue keys.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from test_integration_helpers import (
    ROOT,
    free_port,
    kawhi_serve,
    png,
    reference_logprobs,
    small_image,
    tiny_policy,
)

HAVE_VERL = all(importlib.util.find_spec(m) is not None for m in ("verl", "ray", "transfer_queue"))
pytestmark = pytest.mark.skipif(not HAVE_VERL, reason="verl, ray and TransferQueue not installed: "
                                                      "bash scripts/test_verl.sh")

N = 3  # rollout.n
AGENT_LOOP = "tiny_single_turn"  # verl's SingleTurnAgentLoop with kawhi-tiny's processor (verl_v1_fakes)
TEMPERATURE = 0.8
PROMPTS = [("How long is the altitude CD?", "triangle.png"), ("Which bar is the tallest?", "bar_chart.png")]
RESPONSES = ["The legs are 6 and 8, so AB = 10.\n\nThe area is 24.\n\nCD = 2 * 24 / 10 = 4.8.",
             "CD looks like half of AB.\n\nSo CD = 5.",
             "The bars are 3, 7 and 5.\n\nThe tallest is B.",
             "All bars look equal.\n\nI guess the tallest is A."]
SCORE_FN = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return float(len(solution_str) % 7)
'''


def tokenizer() -> Any:
    from kawhi.engine.engine import TINY_MODEL_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)


def scripted_responses() -> list[list[int]]:
    tok = tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    return [tok(text, add_special_tokens=False)["input_ids"] + [eos] for text in RESPONSES]


def verl_config(tmp_path: Any, kawhi: dict[str, Any]) -> Any:
    """verl's own ppo_trainer config with what `python -m kawhi_client.integrations.verl_v1` adds."""
    import verl
    from hydra import compose, initialize_config_dir
    from kawhi.engine.engine import TINY_MODEL_DIR
    from kawhi_client.integrations import verl_v1
    from omegaconf import OmegaConf

    score = tmp_path / "score.py"
    score.write_text(SCORE_FN)
    agent_loops = tmp_path / "agent_loops.yaml"
    agent_loops.write_text(f"- name: {AGENT_LOOP}\n  _target_: verl_v1_fakes.TinyProcessorAgentLoop\n")
    overrides = [
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loops}",
        "trainer.use_v1=true", f"trainer.v1.trainer_mode={verl_v1.TRAINER_MODE}",
        f"++actor_rollout_ref.rollout.agent.agent_loop_manager_class={verl_v1.MANAGER_CLASS}",
        f"actor_rollout_ref.model.path={TINY_MODEL_DIR}", f"actor_rollout_ref.rollout.n={N}",
        f"actor_rollout_ref.rollout.temperature={TEMPERATURE}", "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.actor.use_kl_loss=true", "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.name=vllm",  # a name only: ScriptedLLM stands in for the engine
        "data.max_prompt_length=512", "data.max_response_length=64", "reward.num_workers=1",
        f"reward.custom_reward_function.path={score}", "reward.custom_reward_function.name=compute_score",
        *[f"+reward.kawhi.{k}={v}" for k, v in kawhi.items() if not isinstance(v, dict)],
        *[f"+reward.kawhi.{k}.{kk}={vv}" for k, v in kawhi.items() if isinstance(v, dict) for kk, vv in v.items()],
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    OmegaConf.resolve(config)  # as verl's TaskRunnerV1.run does
    return config


@pytest.fixture(scope="module")
def service() -> Any:
    with kawhi_serve() as url:
        yield url


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Ray (2 CPUs' worth of actors on a shared machine) and verl's TransferQueue."""
    import ray
    import transfer_queue as tq
    from kawhi_client.integrations import verl_v1
    from omegaconf import OmegaConf

    paths = os.pathsep.join(str(ROOT / p) for p in ("client", "service", "tests/support", "tests/integrations"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": paths + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
                          # what the entry point adds to verl's ray_init.runtime_env
                          "worker_process_setup_hook": verl_v1.SETUP_HOOK})
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield ray
    tq.close()
    ray.shutdown()


def requests_served(url: str) -> float:
    import httpx

    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("kawhi_requests_total{") and 'route="/v1/reweight"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def rollout(config: Any, cluster: Any) -> tuple[Any, list[str], dict[str, Any]]:
    """verl's sync step up to the replay buffer: prompts in, the agent loop (the kawhi manager,
    loaded by verl's loader) writes the groups to the TransferQueue; returns the sample keys
    as a ``KVBatchMeta``, the uids and the worker's KAWHI counters."""
    import numpy as np
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.experimental.reward_loop import RewardLoopManager
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.import_utils import load_class_from_fqn
    from verl_v1_fakes import ScriptedLLM

    manager_cls = load_class_from_fqn(config.actor_rollout_ref.rollout.agent.agent_loop_manager_class, "AgentLoopManager")
    rewards = RewardLoopManager(config, rm_resource_pool=None)
    manager = manager_cls.create(config=config, llm_client=ScriptedLLM(scripted_responses()), teacher_client=None,
                                 reward_loop_worker_handles=rewards.reward_loop_worker_handles)
    try:
        rows = [{"raw_prompt": [{"role": "user", "content": [{"type": "image", "image": small_image(image)},
                                                              {"type": "text", "text": question}]}],
                 "data_source": "kawhi-test", "reward_model": {"ground_truth": "", "style": "rule"},
                 "extra_info": {"question": question, "image": image}, "index": i, "agent_name": AGENT_LOOP}
                for i, (question, image) in enumerate(PROMPTS)]
        batch_dict = collate_fn(rows)
        batch_dict["uid"] = np.array([uuid.uuid4().hex for _ in rows], dtype=object)
        batch = tu.get_tensordict(batch_dict)
        tu.assign_non_tensor_data(batch, "global_steps", 1)
        uids = list(batch["uid"])
        tq.kv_batch_put(keys=uids, partition_id="train",
                        tags=[{"is_prompt": True, "status": "pending", "global_steps": 1} for _ in uids])
        manager.generate_sequences(batch)
        deadline = time.monotonic() + 300
        while True:  # what verl's ReplayBuffer waits for: every group settled
            tags = tq.kv_list("train")["train"]
            if all(tags[u].get("status") in ("finished", "failure") for u in uids):
                break
            assert time.monotonic() < deadline, tags
            time.sleep(0.2)
        assert all(tags[u]["status"] == "finished" for u in uids), tags
        keys = sorted(k for k in tags if k.split("_")[0] in uids and k not in uids)
        stats = cluster.get(manager.agent_loop_workers[0].kawhi_stats.remote())
    finally:
        for handle in [*manager.agent_loop_workers, *rewards.reward_loop_worker_handles]:
            cluster.kill(handle)
    # the actor's forward (GPU) would write old_log_probs here
    data = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["response_mask"])
    zeros = data["response_mask"].to_padded_tensor(0).float() * 0
    from verl.workers.utils.padding import response_to_nested

    tq.kv_batch_put(keys=keys, partition_id="train",
                    fields=tu.get_tensordict({"old_log_probs": response_to_nested(zeros, data["response_mask"])}))
    return KVBatchMeta(partition_id="train", keys=keys, tags=[tags[k] for k in keys]), uids, stats


def trainer(config: Any) -> Any:
    from verl.trainer.ppo.v1 import get_trainer_cls

    cls = get_trainer_cls(config.trainer.v1.trainer_mode)
    instance = object.__new__(cls)  # without init(): that starts the GPU worker groups
    instance.config = config
    return instance


def plain_grpo(data: Any) -> Any:
    """verl's GRPO on the TransferQueue's scores, computed here."""
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    mask = data["response_mask"].to_padded_tensor(0)
    adv, _ = compute_grpo_outcome_advantage(data["rm_scores"].to_padded_tensor(0.0), mask,
                                            np.array(list(data["uid"]), dtype=object), norm_adv_by_std_in_grpo=True)
    return adv


def sample_prompt(data: Any, i: int) -> tuple[str, str]:
    info = list(data["extra_info"])[i]
    return info["question"], info["image"]


def plain_reference_forward(question: str, image_name: str, ids: list[int]) -> Any:
    """Per-token log-probs of ``ids`` under kawhi-tiny at verl's temperature (a plain forward)."""
    return reference_logprobs(tiny_policy().eval(), question, image_name, ids, TEMPERATURE)


# ---------------------------------------------------------------------- tests


def test_verls_own_loaders_find_the_kawhi_classes(tmp_path: Any, cluster: Any) -> None:
    from kawhi_client.integrations import verl_v1
    from verl.utils.import_utils import load_class_from_fqn

    config = verl_config(tmp_path, {"url": "http://kawhi.example:8000"})
    assert load_class_from_fqn(config.actor_rollout_ref.rollout.agent.agent_loop_manager_class,
                               "AgentLoopManager") is verl_v1.KawhiAgentLoopManagerTQ

    @cluster.remote(num_cpus=0)
    def lookup(mode: str) -> tuple[str, str, bool]:
        # a fresh Ray process that imported nothing of kawhi: only the setup hook ran
        import sys as worker_sys

        from verl.trainer.ppo.v1 import get_trainer_cls

        cls = get_trainer_cls(mode)
        return cls.__module__, cls.__name__, "kawhi_client.integrations.verl_v1" in worker_sys.modules

    assert cluster.get(lookup.remote(config.trainer.v1.trainer_mode)) == (
        "kawhi_client.integrations.verl_v1", "KawhiPPOTrainer", True)

    # the documented command composes verl's own config with the KAWHI settings: bare (the
    # entry point adds them) and with the example's complete config
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), os.environ.get("PYTHONPATH", "")])}
    example = ["--config-path", str(ROOT / "examples" / "verl"), "--config-name", "qwen2_5_vl_grpo_kawhi"]
    for args, url in (([], "+reward.kawhi.url"), (example, "reward.kawhi.url")):
        out = subprocess.run([sys.executable, "-m", "kawhi_client.integrations.verl_v1", *args, "--cfg", "job",
                              f"{url}=http://kawhi.example:8000"], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        for line in ("use_v1: true", "trainer_mode: kawhi", f"agent_loop_manager_class: {verl_v1.MANAGER_CLASS}",
                     f"worker_process_setup_hook: {verl_v1.SETUP_HOOK}", "url: http://kawhi.example:8000"):
            assert line in out.stdout, (args, line, out.stdout[-3000:])
    for line in ("'n': 5", "ref_logprobs: true", "on_error: raise", "path: /models/Qwen2.5-VL-7B-Instruct"):
        assert line in out.stdout, (line, out.stdout[-3000:])  # the example's own settings


def test_one_request_per_group_and_the_transfer_queue_holds_grpo_times_kawhi(
        tmp_path: Any, cluster: Any, service: Any) -> None:
    import numpy as np
    import torch
    import transfer_queue as tq
    from kawhi_client import Client

    config = verl_config(tmp_path, {"url": service, "ref_logprobs": True})
    before = requests_served(service)
    batch, uids, stats = rollout(config, cluster)
    assert len(batch) == N * len(PROMPTS)
    assert requests_served(service) - before == len(uids) == stats["requests"]  # one request per uid group

    t = trainer(config)
    batch = t._compute_ref_log_prob(batch, {})  # fit's order: reference, then advantage
    batch = t._compute_advantage(batch, {})
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train",
                           select_fields=["advantages", "ref_log_prob", "responses", "response_mask", "rm_scores",
                                          "uid", "extra_info"])
    mask = data["response_mask"].to_padded_tensor(0)
    advantages = data["advantages"].to_padded_tensor(0.0)
    ref = data["ref_log_prob"].to_padded_tensor(0.0)
    grpo = plain_grpo(data)
    assert grpo.abs().max() > 0.5  # the scripted scores differ within a group

    with Client(service) as probe:
        for i, ids in enumerate(data["responses"].unbind()):
            ids = ids.tolist()  # the trainer's own token ids, as the TransferQueue holds them
            question, image = sample_prompt(data, i)
            (result,) = probe.reweight([{
                "image": png(small_image(image)),
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                "responses": [{"text": "", "token_ids": ids}], "advantages": [1.0]}])
            weights = torch.tensor(result.responses[0].token_weights)
            n = len(ids)
            assert int(mask[i].sum()) == n and len(weights) == n
            torch.testing.assert_close(advantages[i, :n], grpo[i, :n] * weights, atol=1e-6, rtol=0)
            assert len(torch.unique(weights)) >= 2  # per paragraph, not one number per sample
            # float32 log-probs of size 10-20: the service's batched forward and this single one sum in
            # another order, a few ulps of the value apart (seen: 1.1e-5 at a log-prob of -14, 8e-7 relative)
            torch.testing.assert_close(ref[i, :n], plain_reference_forward(question, image, ids), atol=1e-5, rtol=2e-6)
    assert (advantages - grpo).abs().max() > 0.05  # not plain GRPO
    assert np.isfinite(advantages.numpy()).all()


@pytest.mark.parametrize("on_error", ["fallback", "raise"])
def test_a_service_outage_follows_the_policy(tmp_path: Any, cluster: Any, on_error: str) -> None:
    import torch
    import transfer_queue as tq
    from kawhi_client.integrations import KawhiFallbackWarning, KawhiIntegrationError
    from kawhi_client.integrations.verl_shared import driver_policy

    dead = f"http://127.0.0.1:{free_port()}"
    config = verl_config(tmp_path, {"url": dead, "on_error": on_error, "deadline_s": 5,
                                    "client": {"retries": 0, "wait_ready": False, "connect_timeout": 1.0}})
    batch, uids, stats = rollout(config, cluster)
    assert stats["requests"] == len(uids)  # one (failed) request per group, none per sample
    t = trainer(config)
    if on_error == "raise":
        with pytest.raises(KawhiIntegrationError, match="KawhiConnectionError|connect"):
            t._compute_advantage(batch, {})
        return
    assert stats["fallback_rows"] == len(batch)
    before = driver_policy().stats()
    with pytest.warns(KawhiFallbackWarning, match=f"{len(batch)} of {len(batch)} samples have no KAWHI weights"):
        batch = t._compute_advantage(batch, {})
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train",
                           select_fields=["advantages", "response_mask", "rm_scores", "uid"])
    torch.testing.assert_close(data["advantages"].to_padded_tensor(0.0), plain_grpo(data), atol=1e-6, rtol=0)
    assert driver_policy().stats()["fallback_rows"] - before["fallback_rows"] == len(batch)
