"""TRL's GRPOTrainer (trl 1.16) with its KL reference log-probs taken from the service
(``KawhiGRPOTrainer(kawhi_ref_logprobs=True)``): real optimisation steps on CPU with the
kawhi-tiny Qwen2.5-VL as the policy, ``beta`` > 0, no reference model in the trainer.

1. The service serves the policy's own initial weights (a live ``kawhi serve`` of kawhi-tiny,
   which the policy is loaded from): the KL term TRL logs at step 0 is ~0, the
   ``ref_per_token_logps`` the loss received equal the log-probs the service returns to
   this test's own request and the policy's own log-probs computed here by hand.
2. The service serves a different reference (in-process engine, final norm scaled): the
   KL TRL logged and the loss it optimised equal the ones computed here by hand from the
   service's reference log-probs and the frozen initial policy — so the loss used them.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("trl")

import torch
from kawhi.pipeline.local import LocalService
from kawhi_client import Client
from kawhi_client.integrations import InProcessBackend, KawhiIntegrationError
from test_integration_helpers import kawhi_serve, png, small_image, tiny_policy, tiny_processor
from test_integration_trl import PROMPTS, RecordingTrainer, alternating_reward, grpo_args, make_dataset, unshuffle

BETA, TEMPERATURE = 0.04, 0.7


def ref_args(tmp_path: Any) -> Any:
    args = grpo_args(tmp_path)
    args.beta, args.temperature = BETA, TEMPERATURE
    return args


def left_padding_processor() -> Any:
    processor = tiny_processor()
    processor.tokenizer.padding_side = "left"  # as TRL's own AutoProcessor(..., padding_side="left")
    return processor


def run_step(tmp_path: Any, kawhi: Any, **kwargs: Any) -> tuple[RecordingTrainer, Any]:
    policy = tiny_policy()
    initial = copy.deepcopy(policy)
    trainer = RecordingTrainer(model=policy, reward_funcs=alternating_reward, args=ref_args(tmp_path),
                               train_dataset=make_dataset(), processing_class=left_padding_processor(), kawhi=kawhi,
                               kawhi_ref_logprobs=True, **kwargs)
    assert trainer.ref_model is None and trainer.beta == BETA and trainer.args.beta == BETA
    trainer.train()
    assert trainer.state.global_step == 1
    return trainer, initial


def policy_logps(initial: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """(B, T) log-probs of the completions under the frozen initial policy at TRL's temperature."""
    model = copy.deepcopy(initial).eval()
    completion_ids = inputs["completion_ids"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if inputs.get(k) is not None}
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    T = completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1:-1, :].float() / TEMPERATURE, dim=-1)
    return logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def service_ref_logprobs(trainer: RecordingTrainer, reweight: Any) -> torch.Tensor:
    """(B, T) reference log-probs of the generated batch from a request this test builds itself."""
    out = trainer.generated[0]
    mask = out["completion_mask"].bool()
    rows = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2  # RepeatSampler order
    groups = []
    for g in range(2):
        q, img = rows[2 * g]
        groups.append({
            "image": png(small_image(img)),
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            "responses": [{"text": "", "token_ids": out["completion_ids"][i][mask[i]].tolist()}
                          for i in (2 * g, 2 * g + 1)],
            "advantages": [1.0, 1.0],
        })
    expected = torch.zeros(mask.shape)
    for g, result in enumerate(reweight(groups)):
        assert result.error is None, result.error
        for k, response in enumerate(result.responses):
            expected[2 * g + k, mask[2 * g + k]] = torch.tensor(response.ref_logprobs)
    return expected


def test_trl_kl_reference_from_live_service_sharing_the_policys_weights(tmp_path: Any) -> None:
    with kawhi_serve() as url:
        client = Client(url, timeout=60)
        trainer, initial = run_step(tmp_path, kawhi=client, kawhi_options={"granularity": "token"})
        with Client(url) as probe:
            expected = service_ref_logprobs(trainer, lambda groups: probe.reweight(
                groups, return_ref_logprobs=True, logprob_temperature=TEMPERATURE))
        client.close()
    loss_in = trainer.loss_calls[0]["inputs"]
    mask = loss_in["completion_mask"].bool()
    used = loss_in["ref_per_token_logps"]
    assert used.shape == mask.shape
    torch.testing.assert_close(used[mask], expected[unshuffle(trainer)][mask], atol=1e-5, rtol=0)
    # the service's reference is the policy itself: its log-probs are the policy's own ...
    own = policy_logps(initial, loss_in)
    torch.testing.assert_close(used[mask], own[mask], atol=1e-4, rtol=0)
    assert own[mask].std() > 0.3  # (and far from uniform: a position slip would show)
    # ... so TRL's KL term at step 0 is ~0, while the loss did take the KL branch (beta > 0)
    logged = trainer.state.log_history[0]
    assert "kl" in logged and abs(logged["kl"]) < 1e-5
    assert trainer.kawhi.policy.reweighted_rows == 4  # zero-advantage rows are sent too


def test_trl_loss_uses_the_services_reference_logprobs(tmp_path: Any) -> None:
    from kawhi.engine.engine import TINY_MODEL_DIR, Engine
    from kawhi.models.qwen import QwenVLReference

    reference = QwenVLReference.from_pretrained(TINY_MODEL_DIR, dtype="float32", name="other-reference")
    with torch.no_grad():
        reference._base.language_model.norm.weight.mul_(2.0)  # a reference that is not the policy
    engine = Engine(reference)
    trainer, initial = run_step(tmp_path, kawhi=InProcessBackend(engine))
    expected = service_ref_logprobs(trainer, lambda groups: LocalService(engine).reweight(
        [{**g, "image": {"data": __import__("base64").b64encode(g["image"]).decode()}} for g in groups],
        {"return_ref_logprobs": True, "logprob_temperature": TEMPERATURE}))
    loss_in = trainer.loss_calls[0]["inputs"]
    mask = loss_in["completion_mask"].bool()
    ref = expected[unshuffle(trainer)]
    torch.testing.assert_close(loss_in["ref_per_token_logps"][mask], ref[mask], atol=1e-5, rtol=0)
    logp = policy_logps(initial, loss_in)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    hand_kl = float(kl[mask].mean())
    assert hand_kl > 0.01
    assert trainer.state.log_history[0]["kl"] == pytest.approx(hand_kl, rel=1e-4)
    m = mask.float()
    per_token = -loss_in["advantages"] + BETA * kl  # one iteration: the ratio is 1 in value
    hand_loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    assert float(trainer.loss_calls[0]["loss"]) == pytest.approx(float(hand_loss), rel=1e-4, abs=1e-7)


def test_trl_ref_logprobs_switch_refuses_what_it_cannot_honour(tmp_path: Any) -> None:
    from server_fixtures import default_engine

    common = dict(model=tiny_policy(), reward_funcs=alternating_reward, train_dataset=make_dataset(),
                  kawhi=InProcessBackend(default_engine()), kawhi_ref_logprobs=True)
    from kawhi_client.integrations.trl import KawhiGRPOTrainer

    with pytest.raises(ValueError, match="beta > 0"):
        KawhiGRPOTrainer(args=grpo_args(tmp_path), processing_class=left_padding_processor(), **common)
    with pytest.raises(ValueError, match="logprob_temperature"):
        KawhiGRPOTrainer(args=ref_args(tmp_path), processing_class=left_padding_processor(),
                         kawhi_options={"logprob_temperature": 1.0}, **common)
    frozen = ref_args(tmp_path)
    frozen.sync_ref_model = True
    with pytest.raises(ValueError, match="sync_ref_model"):  # the service's reference never moves
        KawhiGRPOTrainer(args=frozen, processing_class=left_padding_processor(), **common)
    with pytest.raises(ValueError, match="pads on the left"):  # TRL would misalign a shorter prompt's image
        KawhiGRPOTrainer(args=ref_args(tmp_path), processing_class=tiny_processor(), **common)


def test_trl_service_down_fails_the_step_even_under_fallback(tmp_path: Any) -> None:
    from test_integration_trl import dead_url

    client = Client(dead_url(), retries=0, wait_ready=False, connect_timeout=1.0, timeout=2.0)
    with pytest.warns(Warning), pytest.raises(KawhiIntegrationError, match="no reference log-probs"):
        run_step(tmp_path, kawhi=client, kawhi_on_error="fallback")
