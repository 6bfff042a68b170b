"""TRL's GRPOTrainer (trl 1.16) with KAWHI: real optimisation steps on CPU with a tiny
Qwen2.5-VL policy (kawhi-tiny's weights, the model the service serves), against a live `kawhi serve`
subprocess and against the in-process engine.

The proof that the loss saw KAWHI's token advantages, not the uniform ones:

1. the ``advantages`` tensor ``GRPOTrainer._compute_loss`` received equals, token for
   token, the ``token_advantages`` the service returns for the same rollouts when this
   test builds the request itself (its own wire groups, its own client) — and differs
   from TRL's uniform ``A_i`` broadcast;
2. the gradient the optimiser stepped with equals the gradient of the GRPO objective
   computed here by hand from the frozen initial policy with the service's token
   advantages, and differs from the one with the uniform advantages.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

pytest.importorskip("trl")

import torch
from datasets import Dataset
from kawhi.pipeline.local import LocalService
from kawhi_client import Client
from kawhi_client.integrations import InProcessBackend, KawhiFallbackWarning, KawhiIntegrationError
from kawhi_client.integrations.trl import KawhiGRPOTrainer
from test_integration_helpers import (
    default_engine,
    free_port,
    kawhi_serve,
    png,
    small_image,
    tiny_policy,
    tiny_processor,
)
from transformers import TrainerCallback
from trl import GRPOConfig

PROMPTS = [("How long is the altitude CD?", "triangle.png"), ("Which bar is the tallest?", "bar_chart.png")]
# Token granularity gives every token its own weight, so random 8-token completions (which
# never contain a paragraph break) still get non-uniform advantages: the test can tell.
OPTIONS = {"granularity": "token", "temperature": 0.05}


def make_dataset() -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "image": small_image(img)}
                              for q, img in PROMPTS])


def alternating_reward(completions: list, **kwargs: Any) -> list[float]:
    """Rows come as [p0, p0, p1, p1]: every group gets rewards {0, 1}, so every advantage is +-0.707."""
    return [float(i % 2) for i in range(len(completions))]


def grpo_args(tmp_path: Any) -> GRPOConfig:
    return GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=8, max_steps=1, learning_rate=1e-3, loss_type="grpo", beta=0.0,
        temperature=1.0, max_grad_norm=0.0, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
    )


class GradCapture(TrainerCallback):
    """The gradient the optimiser is about to step with (clipping is off)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class RecordingTrainer(KawhiGRPOTrainer):
    """Records what KawhiGRPOTrainer produced and what the loss received; changes nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated: list[dict[str, Any]] = []
        self.loss_calls: list[dict[str, Any]] = []

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        self.generated.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in output.items()})
        return output

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        loss = super()._compute_loss(model, inputs)
        self.loss_calls.append({"inputs": {k: v.detach().clone() if torch.is_tensor(v) else v
                                           for k, v in inputs.items()}, "loss": loss.detach().clone()})
        return loss


def run_one_step(tmp_path: Any, kawhi: Any, **kwargs: Any) -> tuple[RecordingTrainer, Any, GradCapture]:
    policy = tiny_policy()
    initial = copy.deepcopy(policy)
    grads = GradCapture()
    trainer = RecordingTrainer(model=policy, reward_funcs=alternating_reward, args=grpo_args(tmp_path),
                               train_dataset=make_dataset(), processing_class=tiny_processor(),
                               callbacks=[grads], kawhi=kawhi, **kwargs)
    trainer.train()
    return trainer, initial, grads


# ---------------------------------------------------------------------- independent expectation


def expected_token_advantages(trainer: RecordingTrainer, reweight: Any) -> torch.Tensor:
    """(B, T) advantages for the generated batch, from a request this test builds itself."""
    out = trainer.generated[0]
    mask = out["completion_mask"].bool()
    uniform = torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float32)  # TRL's own (B,), pre-shuffle
    assert uniform.shape[0] == mask.shape[0] == 4
    rows = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2  # RepeatSampler order: each prompt num_generations times
    groups = []
    for g in range(2):
        q, img = rows[2 * g]
        groups.append({
            "image": png(small_image(img)),
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            "responses": [{"text": "", "token_ids": out["completion_ids"][i][mask[i]].tolist()} for i in (2 * g, 2 * g + 1)],
            "advantages": [float(uniform[2 * g]), float(uniform[2 * g + 1])],
        })
    results = reweight(groups)
    expected = torch.zeros(mask.shape, dtype=torch.float32)
    for g, result in enumerate(results):
        assert result.error is None, result.error
        for k, response in enumerate(result.responses):
            i = 2 * g + k
            expected[i, mask[i]] = torch.tensor(response.token_advantages, dtype=torch.float32)
    return expected


def unshuffle(trainer: RecordingTrainer) -> list[int]:
    """perm[j] = the pre-shuffle row of the loss batch's row j (TRL shuffles before the loss)."""
    gen, loss_in = trainer.generated[0], trainer.loss_calls[0]["inputs"]
    perm = []
    for j in range(loss_in["completion_ids"].shape[0]):
        hits = [i for i in range(gen["completion_ids"].shape[0])
                if torch.equal(gen["completion_ids"][i], loss_in["completion_ids"][j])
                and torch.equal(gen["prompt_ids"][i], loss_in["prompt_ids"][j]) and i not in perm]
        assert hits, "a loss row matches no generated row"
        perm.append(hits[0])
    return perm


def hand_gradient(initial: Any, inputs: dict[str, Any], advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the GRPO objective (loss_type='grpo', beta=0, one iteration, so the ratio
    is 1 and d ratio = d log p): -mean_i sum_t A_it m_it log p_it / |m_i|, by hand."""
    model = copy.deepcopy(initial)
    model.train()
    model.zero_grad(set_to_none=True)
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"].float()
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    extra = {k: inputs[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids") if inputs.get(k) is not None}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    T = completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1:-1, :].float(), dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    loss = (-(advantages * logp * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in names])


def assert_loss_saw_kawhi(trainer: RecordingTrainer, initial: Any, grads: GradCapture, expected: torch.Tensor) -> None:
    perm = unshuffle(trainer)
    loss_in = trainer.loss_calls[0]["inputs"]
    used = loss_in["advantages"]
    assert used.shape == loss_in["completion_ids"].shape  # (B, T), not TRL's (B,)
    expected = expected[perm]
    mask = loss_in["completion_mask"].bool()
    uniform = torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float32)[perm].unsqueeze(1) * mask

    # 1. the tensor the loss multiplied is the service's token advantages, not the uniform ones
    torch.testing.assert_close(used, expected, rtol=0, atol=1e-6)
    assert (used - uniform).abs().max() > 1e-2
    weights = used[mask] / uniform[mask]
    assert weights.min() >= 0.1 - 1e-5 and weights.max() <= 1.0 + 1e-5  # w in [w_min, w_max]
    assert weights.std() > 1e-3  # ... and not all equal

    # 2. the optimiser's gradient is the gradient with the service's advantages
    names = sorted(grads.grads)
    assert names
    g_trainer = flat(grads.grads, names)
    g_kawhi = flat(hand_gradient(initial, loss_in, expected), names)
    g_uniform = flat(hand_gradient(initial, loss_in, uniform), names)
    assert g_trainer.norm() > 0
    torch.testing.assert_close(g_trainer, g_kawhi, rtol=1e-3, atol=1e-5 * float(g_kawhi.abs().max()))
    assert (g_trainer - g_uniform).norm() > 0.05 * g_trainer.norm()

    # 3. it was an optimisation step: the weights moved
    moved = [n for n, p in trainer.model.named_parameters()
             if not torch.equal(p.detach(), dict(initial.named_parameters())[n].detach())]
    assert moved


# ---------------------------------------------------------------------- the tests


def test_trl_step_against_live_kawhi_serve(tmp_path: Any) -> None:
    with kawhi_serve() as url:
        client = Client(url, timeout=60)
        trainer, initial, grads = run_one_step(tmp_path, kawhi=client, kawhi_options=OPTIONS)
        assert trainer.state.global_step == 1
        assert trainer.kawhi_tokenizer_ok is True  # checked against /v1/info's tokenizer_fingerprint
        assert trainer.kawhi.policy.stats() == {"on_error": "raise", "fallbacks": 0, "fallback_rows": 0,
                                                "reweighted_rows": 4}
        assert client.stats.snapshot()["images_uploaded"] == 2  # each image sent once, then referenced by sha256
        with Client(url) as probe:  # the test's own request, own client
            expected = expected_token_advantages(trainer, lambda groups: probe.reweight(groups, **OPTIONS))
        client.close()
    assert_loss_saw_kawhi(trainer, initial, grads, expected)


def test_trl_step_in_process_engine(tmp_path: Any) -> None:
    engine = default_engine()
    trainer, initial, grads = run_one_step(tmp_path, kawhi=InProcessBackend(engine), kawhi_options=OPTIONS)
    assert trainer.kawhi.backend.kind == "in-process" and trainer.kawhi_tokenizer_ok is True
    assert trainer.kawhi.policy.reweighted_rows == 4
    expected = expected_token_advantages(trainer, lambda groups: LocalService(engine).reweight(
        [{**g, "image": {"data": base64.b64encode(g["image"]).decode()}} for g in groups], OPTIONS))
    assert_loss_saw_kawhi(trainer, initial, grads, expected)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_trl_service_down_fallback_keeps_uniform_advantages_and_counts(tmp_path: Any) -> None:
    client = Client(dead_url(), retries=0, wait_ready=False, connect_timeout=1.0, timeout=2.0)
    with pytest.warns(KawhiFallbackWarning, match="UNWEIGHTED"):
        trainer, _, _ = run_one_step(tmp_path, kawhi=client, kawhi_on_error="fallback")
    assert trainer.state.global_step == 1
    policy = trainer.kawhi.policy
    assert (policy.fallbacks, policy.fallback_rows, policy.reweighted_rows) == (1, 4, 0)
    assert policy.events[0].reason == "service call failed" and "KawhiConnectionError" in policy.events[0].detail
    used = trainer.loss_calls[0]["inputs"]["advantages"]
    mask = trainer.loss_calls[0]["inputs"]["completion_mask"].bool()
    uniform = torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float32)[unshuffle(trainer)]
    torch.testing.assert_close(used, uniform.unsqueeze(1) * mask, rtol=0, atol=0)
    logged = trainer.state.log_history[0]  # the counters reach TRL's logs (wandb, tensorboard ...)
    assert (logged["kawhi/fallback_rows"], logged["kawhi/reweighted_frac"], logged["kawhi/fallbacks_total"]) == (4, 0, 1)
    assert all(not r.reweighted and r.reason.startswith("fallback") for r in trainer.kawhi_last)


def test_trl_service_down_raise_is_the_default(tmp_path: Any) -> None:
    client = Client(dead_url(), retries=0, wait_ready=False, connect_timeout=1.0, timeout=2.0)
    with pytest.raises(KawhiIntegrationError, match="service call failed") as info:
        run_one_step(tmp_path, kawhi=client)
    assert info.value.__cause__ is not None  # the client's typed error travels along


def test_trl_bad_options_fail_at_construction(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="temprature"):
        KawhiGRPOTrainer(model=tiny_policy(), reward_funcs=alternating_reward, args=grpo_args(tmp_path),
                         train_dataset=make_dataset(), processing_class=tiny_processor(),
                         kawhi=InProcessBackend(default_engine()), kawhi_options={"temprature": 0.1})
