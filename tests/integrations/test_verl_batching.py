"""verl's reward loop hands the reward manager one task per sample, all at once; the
SampleBatcher sends them in one call, where a GRPO group's samples become one group.
(verl itself is not needed: the pattern of RewardLoopWorker.compute_score_batch is
reproduced with asyncio exactly as verl writes it.)"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from kawhi.pipeline.local import LocalService
from kawhi_client.integrations.common import Reweighter, Rollout, RowResult
from kawhi_client.integrations.verl import SampleBatcher
from server_fixtures import default_engine, png_bytes


def compute_score_batch(run_single: Any, samples: list[Any]) -> list[Any]:
    """verl's RewardLoopWorker.compute_score_batch: a task per sample, then gather."""

    async def batch() -> list[Any]:
        tasks = [asyncio.create_task(run_single(s)) for s in samples]
        return await asyncio.gather(*tasks)

    return asyncio.run(batch())


def test_samples_scored_together_go_in_one_call_in_order() -> None:
    calls: list[list[int]] = []

    def reweight(rollouts: list[Rollout]) -> list[RowResult]:
        calls.append([len(r.token_ids) for r in rollouts])
        return [RowResult([float(len(r.token_ids))], [1.0], True) for r in rollouts]

    batcher = SampleBatcher(reweight, max_wait_s=0)

    async def run_single(n: int) -> float:
        kawhi = asyncio.ensure_future(batcher.submit(Rollout(token_ids=[1] * n)))
        await asyncio.sleep(0.001 * (n % 3))  # the inner reward manager's own work
        return (await kawhi).token_advantages[0]

    assert compute_score_batch(run_single, list(range(1, 13))) == [float(n) for n in range(1, 13)]
    assert calls == [list(range(1, 13))]


def test_a_raising_policy_fails_every_sample_of_the_call() -> None:
    def reweight(rollouts: list[Rollout]) -> list[RowResult]:
        raise RuntimeError("service down")

    batcher = SampleBatcher(reweight, max_wait_s=0)

    async def run_single(n: int) -> Any:
        return await batcher.submit(Rollout(token_ids=[1] * n))

    with pytest.raises(RuntimeError, match="service down"):
        compute_score_batch(run_single, [1, 2, 3])


def test_a_group_of_samples_is_sent_as_one_group_with_the_same_weights() -> None:
    engine = default_engine()
    sent: list[list[dict]] = []

    class Backend:
        kind = "in-process"

        def reweight(self, groups: list[dict], options: dict) -> Any:
            sent.append(groups)
            return LocalService(engine).reweight([{**g, "image": {"data": base64.b64encode(g["image"]).decode()}} for g in groups],
                                   options)

    reweighter = Reweighter(Backend(), on_error="raise", skip_zero_advantage=False)
    images = [png_bytes(56, 56, seed) for seed in (3, 4)]
    texts = ["A square.\n\nAnswer: 1", "Two lines.\n\nAnswer: 2", "Nothing at all here.", "A square and a line."]
    rollouts = [Rollout(token_ids=engine.model.tokenize(t).token_ids, image=images[g], prompt=f"q{g}", advantage=1.0)
                for g in (0, 1) for t in texts]
    batcher = SampleBatcher(reweighter.reweight, max_wait_s=0)

    async def run_single(r: Rollout) -> RowResult:
        return await batcher.submit(r)

    together = compute_score_batch(run_single, rollouts)
    assert len(sent) == 1 and [len(g["responses"]) for g in sent[0]] == [4, 4]
    for r, row in zip(rollouts, together):
        (alone,) = reweighter.reweight([r])
        # 1e-6: a float32 forward of four responses rounds differently from one of a single response
        # (~1e-7 on kawhi-tiny's activations); a row given another row's weights is off by > 0.1
        assert row.reweighted and row.token_weights == pytest.approx(alone.token_weights, abs=1e-6)
