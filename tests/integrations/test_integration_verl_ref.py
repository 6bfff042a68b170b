"""verl with its KL reference log-probs from the service (``+reward.kawhi.ref_logprobs=true``),
against verl 0.9.1's real code (run in the side venv by scripts/test_verl.sh):

* verl's role mapping (``main_ppo_v0.BaseTaskRunner.add_actor_rollout_worker``) no longer
  maps the fused actor + reference worker when the switch is on (KL loss on);
* verl's real reward loop (Ray ``RewardLoopWorker`` actors) returns the reference
  log-probs with the weights; the trainer's reference step
  (``RayPPOTrainer._compute_ref_log_prob``) yields them as ``ref_log_prob``, which verl's
  ``DataProto.union`` merges; verl's own KL-in-reward stage (``apply_kl_penalty``), its
  KL loss (``core_algos.kl_penalty``) and ``compute_advantage`` then run on them. With the
  policy's log-probs computed here by a plain transformers forward of the same weights
  the KL is ~0; with shifted old log-probs the penalty is the hand-computed one.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kawhi.pipeline.local import LocalService
from kawhi_client.integrations import KawhiIntegrationError
from kawhi_client.integrations import verl as kv
from test_integration_helpers import default_engine, png, reference_logprobs, small_image, tiny_policy
from test_integration_verl import PROMPTS, legacy_batch, needs_verl, ray_session, verl_config  # noqa: F401

TEMPERATURE = 0.8


def test_ref_logprobs_round_trip_exactly() -> None:
    import struct

    values = [struct.unpack("<f", struct.pack("<f", v))[0] for v in (-0.1, -7.25, -1e-6, -30.0)]
    assert kv.decode_ref_logprobs(kv.encode_ref_logprobs(values)) == (values, None)
    assert kv.decode_ref_logprobs(kv.encode_fallback("service down")) == (None, "service down")
    with pytest.raises(KawhiIntegrationError):
        kv.decode_ref_logprobs("something else")


def ref_config(tmp_path: Any, kawhi: dict[str, Any]) -> Any:
    from omegaconf import OmegaConf

    config = verl_config(tmp_path, {**kawhi, "ref_logprobs": True})
    config.actor_rollout_ref = OmegaConf.merge(config.actor_rollout_ref, {
        "rollout": {"temperature": TEMPERATURE}, "actor": {"use_kl_loss": True}})
    config.algorithm = OmegaConf.merge(config.algorithm, {"use_kl_in_reward": True})
    return config


@needs_verl
def test_role_mapping_builds_no_reference_worker_when_the_service_provides_it(tmp_path: Any) -> None:
    from omegaconf import OmegaConf
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.utils import Role, need_reference_policy

    kv.install()
    for on in (False, True):
        config = verl_config(tmp_path, {"url": "in-process", "ref_logprobs": on})
        config.actor_rollout_ref = OmegaConf.merge(config.actor_rollout_ref, {"actor": {"use_kl_loss": True}})
        runner = main_ppo_v0.BaseTaskRunner()
        runner.add_actor_rollout_worker(config)
        assert need_reference_policy(config)  # the trainer still runs its reference step and KL loss
        if on:
            assert Role.ActorRollout in runner.role_worker_mapping and Role.ActorRolloutRef not in runner.role_worker_mapping
            assert runner.mapping == {Role.ActorRollout: "global_pool"}
        else:  # verl's own choice: the fused actor + reference worker (a second model copy)
            assert Role.ActorRolloutRef in runner.role_worker_mapping


def policy_logprobs(batch: Any) -> Any:
    """(B, T) log-probs of each response under the kawhi-tiny policy (the weights the service serves),
    by a plain transformers forward of image + chat prompt + response, at verl's temperature."""
    import torch

    policy = tiny_policy().eval()
    T = batch.batch["responses"].shape[1]
    out = torch.zeros(len(batch), T)
    for i in range(len(batch)):
        item = batch[i]
        valid = int(item.batch["attention_mask"][-T:].sum())
        ids = item.batch["responses"][:valid].tolist()
        question = item.non_tensor_batch["raw_prompt"][0]["content"][1]["text"]
        (_, image_name, _), = [p for p in PROMPTS if p[0] == question]
        out[i, :valid] = reference_logprobs(policy, question, image_name, ids, TEMPERATURE)
    return out


@needs_verl
def test_verl_kl_stages_run_on_the_services_reference_logprobs(tmp_path: Any, ray_session: Any) -> None:
    import numpy as np
    import torch
    from verl.experimental.reward_loop.reward_loop import RewardLoopManager
    from verl.trainer.ppo import core_algos, ray_trainer
    from verl.trainer.ppo.reward import extract_reward

    config = ref_config(tmp_path, {"url": "in-process"})
    batch = legacy_batch()
    batch.reorder(torch.tensor([3, 0, 2, 1]))  # what _balance_batch does to the order
    manager = RewardLoopManager(config, rm_resource_pool=None)
    try:
        batch = batch.union(manager.compute_rm_score(batch))
    finally:
        for worker in manager.reward_loop_workers:
            ray_session.kill(worker)
    assert "ref_log_prob" not in batch.batch.keys()  # nothing added before verl's own merge
    reward_tensor, extra = extract_reward(batch)

    # the trainer's reference step, as fit() calls it, then verl's own union
    trainer = object.__new__(ray_trainer.RayPPOTrainer)
    trainer.config = config
    ref_step = trainer._compute_ref_log_prob(batch)
    assert set(ref_step.batch.keys()) == {"ref_log_prob"}
    batch = batch.union(ref_step)
    ref = batch.batch["ref_log_prob"]
    mask = batch.batch["response_mask"].bool()

    # equal to what this test fetches itself, and to the same weights' plain forward
    own = policy_logprobs(batch)
    T = mask.shape[1]
    for i in range(len(batch)):
        item = batch[i]
        question = item.non_tensor_batch["raw_prompt"][0]["content"][1]["text"]
        (_, image_name, _), = [p for p in PROMPTS if p[0] == question]
        ids = item.batch["responses"][:int(mask[i].sum())].tolist()
        (direct,) = LocalService(default_engine()).reweight([{
            "image": {"data": base64.b64encode(png(small_image(image_name))).decode()},
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "responses": [{"text": "", "token_ids": ids}], "advantages": [1.0]}],
            {"return_ref_logprobs": True, "logprob_temperature": TEMPERATURE})
        # 1e-5 absolute, plus float32's own relative precision: a 14-nat log-prob is stored
        # with a spacing of ~1e-6, and the two forwards batch differently
        torch.testing.assert_close(ref[i, :len(ids)], torch.tensor(direct.responses[0].ref_logprobs), atol=1e-5,
                                   rtol=2e-6)
        assert torch.all(ref[i, len(ids):T] == 0)
    torch.testing.assert_close(ref[mask], own[mask], atol=1e-4, rtol=0)
    assert own[mask].std() > 0.3

    # verl's KL-in-reward stage and KL loss, fed with the policy's log-probs: KL ~ 0
    batch.batch["token_level_scores"] = reward_tensor
    batch.non_tensor_batch.update({k: np.array(v) for k, v in extra.items()})
    batch.batch["old_log_probs"] = own
    kl_ctrl = core_algos.FixedKLController(kl_coef=0.1)
    shaped, metrics = ray_trainer.apply_kl_penalty(batch, kl_ctrl=kl_ctrl, kl_penalty="kl")
    assert abs(metrics["actor/reward_kl_penalty"]) < 1e-5
    torch.testing.assert_close(shaped.batch["token_level_rewards"], reward_tensor, atol=1e-5, rtol=0)
    kl_loss = core_algos.kl_penalty(own, ref, kl_penalty="low_var_kl")
    assert float((kl_loss * mask).abs().max()) < 1e-4
    # ... and with a policy 0.25 nats more confident on every token, the hand-computed penalty
    batch.batch["old_log_probs"] = own + 0.25 * mask
    shaped, metrics = ray_trainer.apply_kl_penalty(batch, kl_ctrl=kl_ctrl, kl_penalty="kl")
    expected = reward_tensor - 0.1 * (own + 0.25 * mask - ref) * mask
    torch.testing.assert_close(shaped.batch["token_level_rewards"], expected, atol=1e-5, rtol=0)
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.25, abs=1e-4)
    # the advantage stage still runs on the same batch
    out = ray_trainer.compute_advantage(shaped, adv_estimator="grpo_kawhi", num_repeat=2,
                                        norm_adv_by_std_in_grpo=True, config=config.algorithm)
    assert torch.isfinite(out.batch["advantages"]).all()


@needs_verl
def test_a_sample_without_reference_logprobs_fails_the_reference_step() -> None:
    import torch

    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(KawhiIntegrationError, match="no reference to fall back to"):
        kv.ref_log_prob_tensor([kv.encode_ref_logprobs([-1.0, -2.0, -3.0]), kv.encode_fallback("down")], mask)
    with pytest.raises(KawhiIntegrationError, match="masked tokens"):
        kv.ref_log_prob_tensor([kv.encode_ref_logprobs([-1.0]), kv.encode_ref_logprobs([-1.0] * 3)], mask)
