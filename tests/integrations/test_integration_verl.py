"""verl with KAWHI: the reward-stage manager and the ``grpo_kawhi`` estimator.

Two layers:

* without verl (always run): the stored-weights format, its decoding into a ``(B, T)``
  tensor with the failure policy, and the settings;
* with verl installed (skipped otherwise; verl is not in the dev extra because 0.9.1 pins
  transformers < 5.11 — see docs/integrations.md for how it was installed): verl's own
  code paths — the registries, verl loading ``KawhiRewardManager`` by importlib
  (``pkg://``), a real Ray ``RewardLoopManager`` whose ``RewardLoopWorker`` actors run the
  reward stage against a live ``kawhi serve`` (and in-process), ``DataProto`` union /
  reorder, ``extract_reward``, and the legacy trainer's ``compute_advantage`` with
  ``adv_estimator="grpo_kawhi"``. The advantages are checked against verl's own GRPO
  advantages times token weights this test fetches itself from the service.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from typing import Any

import pytest
from kawhi.pipeline.local import LocalService
from kawhi_client.integrations import KawhiFallbackWarning, KawhiIntegrationError
from kawhi_client.integrations import verl as kv
from test_integration_helpers import ROOT, default_engine, free_port, kawhi_serve, png, small_image

HAVE_VERL = importlib.util.find_spec("verl") is not None and importlib.util.find_spec("ray") is not None
needs_verl = pytest.mark.skipif(not HAVE_VERL, reason="verl (and ray) not installed: see docs/integrations.md")

PROMPTS = [("How long is the altitude CD?", "triangle.png", "4.8"), ("Which bar is the tallest?", "bar_chart.png", "is B")]
RESPONSES = [
    ["The legs are 6 and 8, so AB = 10.\n\nThe area is 24.\n\nCD = 2 * 24 / 10 = 4.8.", "CD looks like half of AB.\n\nSo CD = 5."],
    ["The bars are 3, 7 and 5.\n\nThe tallest is B.", "All bars look equal.\n\nI guess the tallest is A."],
]
SCORE_FN = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return 1.0 if ground_truth in solution_str else 0.0
'''


# ---------------------------------------------------------------------- without verl


def test_weights_round_trip_exactly_and_compactly() -> None:
    weights = [0.1] * 30 + [0.9731234567891234] * 12 + [1.0]
    encoded = kv.encode_weights(weights, "fallback")
    assert isinstance(encoded, str) and len(encoded) < 120  # run-length: 3 runs, not 43 numbers
    assert kv.decode_weights(encoded) == (weights, None, "fallback")
    assert kv.decode_weights(kv.encode_weights([])) == ([], None, "raise")
    assert kv.decode_weights(kv.encode_fallback("KawhiConnectionError")) == (None, "KawhiConnectionError", "fallback")
    with pytest.raises(KawhiIntegrationError):
        kv.decode_weights([0.5, 0.5])


def test_weights_tensor_aligns_fills_and_applies_the_policy() -> None:
    import numpy as np
    import torch

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    encoded = np.array([kv.encode_weights([0.2, 0.4, 0.6]), kv.encode_fallback("down"),
                        kv.encode_weights([0.5, 0.5, 0.5, 0.5])], dtype=object)
    before = kv.driver_policy().stats()
    with pytest.warns(KawhiFallbackWarning, match="1 of 3"):
        w = kv.weights_tensor(encoded, mask)
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.4, 0.6, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    after = kv.driver_policy().stats()
    assert after["fallback_rows"] - before["fallback_rows"] == 1
    assert after["reweighted_rows"] - before["reweighted_rows"] == 2
    # weights for fewer tokens than the mask covers: computed for other tokens -> never misaligned
    short = np.array([kv.encode_weights([0.2, 0.4], "raise")], dtype=object)
    with pytest.raises(KawhiIntegrationError, match="different tokens"):
        kv.weights_tensor(short, mask[:1])
    with pytest.warns(Warning, match="different tokens"):
        w = kv.weights_tensor(np.array([kv.encode_weights([0.2, 0.4], "fallback")], dtype=object), mask[:1])
    assert torch.equal(w, torch.ones(1, 4))


def test_settings_from_config_or_environment(monkeypatch: Any) -> None:
    monkeypatch.delenv("KAWHI_URL", raising=False)
    cfg = {"reward": {"kawhi": {"url": "http://k:1", "on_error": "fallback", "options": {"temperature": 0.2},
                                "client": {"retries": 0}}}}
    s = kv.kawhi_settings(cfg)
    assert (s["url"], s["on_error"], s["options"], s["inner"], s["client"]) == (
        "http://k:1", "fallback", {"temperature": 0.2}, "naive", {"retries": 0})
    monkeypatch.setenv("KAWHI_URL", "http://env:2")
    monkeypatch.setenv("KAWHI_OPTIONS", '{"normalize": "mean"}')
    s = kv.kawhi_settings({})
    assert (s["url"], s["on_error"], s["options"]) == ("http://env:2", "raise", {"normalize": "mean"})
    monkeypatch.delenv("KAWHI_URL")
    with pytest.raises(KawhiIntegrationError, match="not configured"):
        kv.reweighter_from_config({})


# ---------------------------------------------------------------------- verl batches


def tokenizer() -> Any:
    from kawhi.engine.engine import TINY_MODEL_DIR
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)


def raw_prompt(question: str, image_name: str) -> list[dict[str, Any]]:
    """What verl's RLHFDataset._build_messages makes of ``"<image>question"`` with one image."""
    return [{"role": "user", "content": [{"type": "image", "image": small_image(image_name)},
                                         {"type": "text", "text": question}]}]


def legacy_batch() -> Any:
    """The batch of verl's legacy RayPPOTrainer.fit after generation: 2 prompts x n=2."""
    import numpy as np
    import torch
    from verl import DataProto

    tok = tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompts, responses, raws, uids, gts = [], [], [], [], []
    for p, (question, image, gt) in enumerate(PROMPTS):
        for text in RESPONSES[p]:
            prompts.append(tok(question, add_special_tokens=False)["input_ids"])
            responses.append(tok(text, add_special_tokens=False)["input_ids"] + [eos])
            raws.append(raw_prompt(question, image))
            uids.append(f"uid-{p}")
            gts.append(gt)
    B, P, T = len(prompts), max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    response_ids = torch.zeros(B, T, dtype=torch.long)
    attention = torch.zeros(B, P + T, dtype=torch.long)
    for i, (pr, rs) in enumerate(zip(prompts, responses)):
        prompt_ids[i, P - len(pr):] = torch.tensor(pr)  # prompts left-padded, responses right-padded
        response_ids[i, :len(rs)] = torch.tensor(rs)
        attention[i, P - len(pr):P + len(rs)] = 1

    def objects(values: list[Any]) -> Any:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "input_ids": torch.cat([prompt_ids, response_ids], 1),
                 "attention_mask": attention, "response_mask": attention[:, P:]},
        non_tensors={"raw_prompt": objects(raws), "uid": objects(uids), "data_source": objects(["kawhi-test"] * B),
                     "reward_model": objects([{"ground_truth": g, "style": "rule"} for g in gts]),
                     "extra_info": objects([{} for _ in range(B)])},
    )


def verl_config(tmp_path: Any, kawhi: dict[str, Any]) -> Any:
    from kawhi.engine.engine import TINY_MODEL_DIR
    from omegaconf import OmegaConf

    score = tmp_path / "score.py"
    score.write_text(SCORE_FN)
    return OmegaConf.create({
        "actor_rollout_ref": {"model": {"path": str(TINY_MODEL_DIR), "tokenizer_path": None}},
        "reward": {
            "num_workers": 1,
            "reward_model": {"enable": False, "enable_resource_pool": False},
            "reward_manager": {"source": "importlib", "name": "KawhiRewardManager",
                               "module": {"path": "pkg://kawhi_client.integrations.verl", "name": None}},
            "custom_reward_function": {"path": str(score), "name": "compute_score", "reward_kwargs": {}},
            "sandbox_fusion": None,
            # the in-process reference is kawhi-tiny, whose tokenizer the policy above shares
            "kawhi": {"model": str(TINY_MODEL_DIR), **kawhi},
        },
        "algorithm": {"adv_estimator": "grpo_kawhi", "norm_adv_by_std_in_grpo": True, "gamma": 1.0, "lam": 1.0},
    })


def expected_weights(batch: Any, reweight: Any) -> Any:
    """(B, T) token weights fetched by this test itself, one group per row, advantage 1."""
    import torch

    T = batch.batch["responses"].shape[1]
    out = torch.ones(len(batch), T)
    for i in range(len(batch)):
        item = batch[i]
        valid = int(item.batch["attention_mask"][-T:].sum())
        ids = item.batch["responses"][:valid].tolist()
        (question, image_name, _), = [p for p in PROMPTS if p[0] == item.non_tensor_batch["raw_prompt"][0]["content"][1]["text"]]
        (result,) = reweight([{
            "image": png(small_image(image_name)),
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "responses": [{"text": "", "token_ids": ids}], "advantages": [1.0]}])
        assert result.error is None, result.error
        out[i, :valid] = torch.tensor(result.responses[0].token_weights)
    return out


@pytest.fixture(scope="module")
def ray_session() -> Any:
    if not HAVE_VERL:
        pytest.skip("verl not installed")
    import ray

    paths = os.pathsep.join([str(ROOT / "client"), str(ROOT / "service"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": paths, "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def run_reward_and_advantage(config: Any, batch: Any, ray: Any) -> tuple[Any, Any]:
    """verl's legacy fit, reward through advantage: balance (reorder), the colocated reward
    loop (Ray RewardLoopWorker actors), union, extract_reward, compute_advantage."""
    import numpy as np
    import torch
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.reward import extract_reward

    batch.reorder(torch.tensor([3, 0, 2, 1]))  # what _balance_batch does to the order
    manager = RewardLoopManager(config, rm_resource_pool=None)
    try:
        batch = batch.union(manager.compute_rm_score(batch))
    finally:
        for worker in manager.reward_loop_workers:
            ray.kill(worker)
    reward_tensor, extra = extract_reward(batch)
    batch.batch["token_level_scores"] = reward_tensor
    batch.non_tensor_batch.update({k: np.array(v) for k, v in extra.items()})
    batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    out = ray_trainer.compute_advantage(batch, adv_estimator=config.algorithm.adv_estimator, num_repeat=2,
                                        norm_adv_by_std_in_grpo=True, config=config.algorithm)
    return out, extra


def plain_grpo(batch: Any) -> Any:
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    adv, _ = compute_grpo_outcome_advantage(batch.batch["token_level_rewards"], batch.batch["response_mask"],
                                            batch.non_tensor_batch["uid"], norm_adv_by_std_in_grpo=True)
    return adv


# ---------------------------------------------------------------------- with verl


@needs_verl
def test_verl_registries_hold_the_kawhi_pieces_and_load_them_by_importlib(tmp_path: Any) -> None:
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    kv.install()  # idempotent
    kv.install()
    assert core_algos.get_adv_estimator_fn("grpo_kawhi") is kv.compute_grpo_kawhi_advantage
    assert get_reward_manager_cls("kawhi") is kv.KawhiRewardManager
    assert ray_trainer.compute_advantage.__kawhi_original__ is not None
    cfg = verl_config(tmp_path, {"url": "in-process"})
    assert resolve_reward_manager_cls(cfg) is kv.KawhiRewardManager


@needs_verl
def test_verl_reward_manager_on_an_agent_loop_sample_in_process(tmp_path: Any) -> None:
    """The single-sample DataProto verl's agent loop builds for the reward loop
    (AgentLoopWorker._compute_score: kwargs stacked with np.array([v] * n)), through a
    manager built by verl's own load_reward_manager, with the in-process engine."""
    import numpy as np
    import torch
    from tensordict import TensorDict
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    tok = tokenizer()
    cfg = verl_config(tmp_path, {"url": "in-process"})
    manager = load_reward_manager(cfg, tok, reward_router_address=None, reward_model_tokenizer=None)
    assert isinstance(manager, kv.KawhiRewardManager) and manager.reweighter.backend.kind == "in-process"
    question, image, gt = PROMPTS[0]
    prompt = torch.tensor(tok(question, add_special_tokens=False)["input_ids"])
    response = torch.tensor(tok(RESPONSES[0][0], add_special_tokens=False)["input_ids"])
    kwargs = {"raw_prompt": raw_prompt(question, image), "data_source": "kawhi-test",
              "reward_model": {"ground_truth": gt}, "extra_info": {}, "uid": "u0"}
    sample = DataProto(
        batch=TensorDict({"prompts": prompt[None], "responses": response[None],
                          "attention_mask": torch.ones(1, len(prompt) + len(response), dtype=torch.long)}, batch_size=1),
        non_tensor_batch={**{k: np.array([v] * 1) for k, v in kwargs.items()},
                          "__num_turns__": np.array([1]), "tool_extra_fields": np.array([{}], dtype=object)})
    result = manager.loop.run_until_complete(manager.run_single(sample))  # the loop verl bound it to
    assert manager.tokenizer_ok is True  # the policy's tokenizer is the service's
    assert result["reward_score"] == 1.0  # the naive manager's score, untouched
    info = result["reward_extra_info"]
    assert info["acc"] == 1.0 and info[kv.FALLBACK_KEY] == 0.0
    weights, reason, _ = kv.decode_weights(info[kv.WEIGHTS_KEY])
    assert reason is None and len(weights) == len(response)
    (direct,) = LocalService(default_engine()).reweight([{
        "image": {"data": base64.b64encode(png(small_image(image))).decode()},
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "responses": [{"text": "", "token_ids": response.tolist()}], "advantages": [1.0]}])
    assert weights == pytest.approx(direct.responses[0].token_weights, abs=1e-12)
    assert len(set(weights)) == 3  # three paragraphs, three weights


@needs_verl
@pytest.mark.parametrize("backend", ["http", "in-process"])
def test_verl_reward_loop_and_grpo_kawhi_end_to_end(tmp_path: Any, ray_session: Any, backend: Any) -> None:
    import torch

    def run(url: str) -> tuple[Any, Any, Any]:
        config = verl_config(tmp_path, {"url": url})
        out, extra = run_reward_and_advantage(config, legacy_batch(), ray_session)
        return config, out, extra

    if backend == "http":
        from kawhi_client import Client

        with kawhi_serve() as url:
            config, out, extra = run(url)
            with Client(url) as probe:
                weights = expected_weights(out, lambda groups: probe.reweight(groups))
    else:
        config, out, extra = run("in-process")
        weights = expected_weights(out, lambda groups: LocalService(default_engine()).reweight(
            [{**g, "image": {"data": base64.b64encode(g["image"]).decode()}} for g in groups]))

    assert list(extra[kv.FALLBACK_KEY]) == [0.0, 0.0, 0.0, 0.0]
    # the custom reward function scored as without KAWHI: after the reorder [3, 0, 2, 1]
    assert out.batch["token_level_scores"].sum(-1).tolist() == [0.0, 1.0, 1.0, 0.0]
    mask = out.batch["response_mask"].float()
    grpo = plain_grpo(out)
    expected = grpo * weights
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.batch["returns"], expected, rtol=1e-5, atol=1e-6)
    assert (out.batch["advantages"] - grpo).abs().max() > 0.05  # not plain GRPO
    for i in range(len(out)):  # per-paragraph: a few distinct weights per response, all in [0.1, 1]
        w = weights[i][mask[i].bool()]
        assert 2 <= len(torch.unique(w)) <= 3 and w.min() >= 0.1 - 1e-6 and w.max() <= 1.0 + 1e-6


@needs_verl
def test_verl_service_down_fallback_trains_plain_grpo_counted_and_warned(tmp_path: Any, ray_session: Any) -> None:
    import torch

    dead = f"http://127.0.0.1:{free_port()}"
    config = verl_config(tmp_path, {"url": dead, "on_error": "fallback",
                                    "client": {"retries": 0, "wait_ready": False, "connect_timeout": 1.0}})
    before = kv.driver_policy().stats()
    with pytest.warns(KawhiFallbackWarning,
                      match="4 of 4 samples have no KAWHI weights"):
        out, extra = run_reward_and_advantage(config, legacy_batch(), ray_session)
    assert list(extra[kv.FALLBACK_KEY]) == [1.0, 1.0, 1.0, 1.0]
    assert all(v.startswith("kawhi-fallback:") and "KawhiConnectionError" in v for v in extra[kv.WEIGHTS_KEY])
    torch.testing.assert_close(out.batch["advantages"], plain_grpo(out))
    after = kv.driver_policy().stats()
    assert after["fallbacks"] - before["fallbacks"] == 1 and after["fallback_rows"] - before["fallback_rows"] == 4


@needs_verl
def test_verl_service_down_raise_fails_the_reward_stage(tmp_path: Any, ray_session: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = verl_config(tmp_path, {"url": dead, "client": {"retries": 0, "wait_ready": False,
                                                            "connect_timeout": 1.0}})
    with pytest.raises(Exception, match="KAWHI service call failed"):
        run_reward_and_advantage(config, legacy_batch(), ray_session)


@needs_verl
def test_verl_grpo_kawhi_without_weights_refuses_to_train_plain_grpo() -> None:
    import torch
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    batch = legacy_batch()
    scores = torch.zeros(batch.batch["responses"].shape)
    scores[[0, 2], 3] = 1.0
    batch.batch["token_level_rewards"] = scores
    with pytest.raises(KawhiIntegrationError, match="use_v1=false"):  # e.g. the v1 trainer, or no KAWHI reward manager
        ray_trainer.compute_advantage(batch, adv_estimator="grpo_kawhi", num_repeat=2)
    with pytest.raises(KawhiIntegrationError, match="no 'kawhi_token_weights'"):
        get_adv_estimator_fn("grpo_kawhi")(token_level_rewards=scores, response_mask=batch.batch["response_mask"],
                                           index=batch.non_tensor_batch["uid"])
    out = ray_trainer.compute_advantage(batch, adv_estimator="grpo", num_repeat=2)  # other estimators: untouched
    torch.testing.assert_close(out.batch["advantages"], plain_grpo(out))
