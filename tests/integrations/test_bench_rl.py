"""bench.rl's KAWHI arm on a 2-step run through a live ``kawhi serve``: the service is called once
per rollout group (one request per step, every group in it once), and the advantages TRL's loss
trained with are GRPO's own (B,) advantages times the service's token weights.

Plumbing only: the policy starts from the served reference itself (the embedded kawhi-tiny),
and the reward is planted (rows alternate 0 / 1, so every group has a nonzero advantage and every group is
sent). ``granularity: token`` gives every token its own weight, so a uniform weight (which a
one-paragraph random completion would get) cannot pass for a reweight.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("trl")

import httpx
import torch
from kawhi.engine.engine import TINY_MODEL_DIR
from kawhi_client.integrations.trl import KawhiGRPOTrainer

from bench.rl.task import heldout_items, train_items
from bench.rl.trainer import Arm, Hyper, StepClock, build_trainer
from bench.server import Server

STEPS, PROMPTS, G = 2, 2, 4


def alternating_reward(completions: list, **kwargs: Any) -> list[float]:
    return [float(i % 2) for i in range(len(completions))]


class Recording(KawhiGRPOTrainer):
    """Keeps what each step's hook produced and what each loss call received; changes nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated: list[dict[str, Any]] = []
        self.sent: list[list[Any]] = []  # the rollouts handed to the service, per step
        self.answered: list[list[Any]] = []  # the service's RowResults, per step
        self.loss_inputs: list[dict[str, Any]] = []
        reweight = self.kawhi.reweight

        def recording_reweight(rollouts: Any) -> Any:
            rows = reweight(rollouts)
            self.sent.append(list(rollouts))
            self.answered.append(list(rows))
            return rows

        self.kawhi.reweight = recording_reweight

    def _generate_and_score_completions(self, inputs: list) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        self.generated.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in output.items()})
        return output

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        self.loss_inputs.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super()._compute_loss(model, inputs)


def counter(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_steps_one_call_per_group_and_advantages_are_grpo_times_weights(tmp_path: Any) -> None:
    hyper = Hyper(steps=STEPS, prompts_per_step=PROMPTS, num_generations=G, max_completion_length=12,
                  learning_rate=1e-3, eval_every=10**6)
    arm = Arm("kawhi", {"granularity": "token", "temperature": 0.05})
    clock = StepClock()
    with Server(None, flags={"torch_threads": 1}) as srv:
        trainer = build_trainer(arm, 0, hyper, TINY_MODEL_DIR, train_items(4), srv.url, tmp_path, alternating_reward,
                                clock, base=Recording)
        trainer.train()
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    assert trainer.state.global_step == STEPS
    assert trainer.kawhi_tokenizer_ok is True  # the policy's tokenizer is the service's

    # once per group: one /v1/reweight request per step, each of its PROMPTS groups reweighted once
    assert counter(metrics, "kawhi_groups_total") == STEPS * PROMPTS
    assert counter(metrics, "kawhi_requests_total", route="/v1/reweight", status="200") == STEPS
    assert len(trainer.sent) == STEPS
    for rollouts in trainer.sent:
        assert len(rollouts) == PROMPTS * G
        assert len({(r.prompt, str(r.messages)) for r in rollouts}) == PROMPTS

    for step in range(STEPS):
        out, rows, rollouts = trainer.generated[step], trainer.answered[step], trainer.sent[step]
        mask = out["completion_mask"].bool()
        trained = out["advantages"]
        assert trained.shape == mask.shape  # (B, T), not TRL's (B,)
        weights_seen = []
        for i, (rollout, row) in enumerate(zip(rollouts, rows, strict=True)):
            assert row.reweighted and abs(rollout.advantage) > 0.1  # GRPO's own group-normalised advantage
            weights = torch.tensor(row.token_weights)
            expected = torch.zeros(mask.shape[1])
            expected[mask[i]] = rollout.advantage * weights
            torch.testing.assert_close(trained[i], expected, rtol=0, atol=1e-6)
            weights_seen.append(weights)
        weights = torch.cat(weights_seen)
        assert weights.min() >= 0.1 - 1e-6 and weights.max() <= 1.0 + 1e-6
        assert weights.std() > 1e-3  # a real reweight, not all ones

        # what the loss multiplied is that tensor (TRL shuffles rows before the loss: match them;
        # a trained policy can sample the same completion twice, with different planted rewards)
        loss_in = trainer.loss_inputs[step]
        for j in range(loss_in["completion_ids"].shape[0]):
            same = [i for i in range(out["completion_ids"].shape[0])
                    if torch.equal(out["completion_ids"][i], loss_in["completion_ids"][j])
                    and torch.equal(out["prompt_ids"][i], loss_in["prompt_ids"][j])]
            assert same and any(torch.equal(loss_in["advantages"][j], trained[i]) for i in same)

    # the bench's step split saw the service call in every step
    assert len(clock.steps) == STEPS and all(s["kawhi"] > 0 and s["step"] >= s["kawhi"] for s in clock.steps)


def test_heldout_and_train_items_never_share_an_item() -> None:
    train = {(it.question, it.image.tobytes()) for it in train_items(20)}
    held = {(it.question, it.image.tobytes()) for it in heldout_items(20)}
    assert len(train) > 50 and len(held) > 50
    assert not train & held
