"""bench.rl's pure parts on planted records: the reward TRL calls, the step-time split, the
seed aggregation and the tables (the runs themselves: tests/integrations/test_bench_rl.py)."""

from __future__ import annotations

import math

import pytest

from bench.rl.report import accuracy_table, curve, step_split, time_table
from bench.rl.task import exact_match_reward, paragraphs
from bench.rl.trainer import StepClock


def test_reward_is_exact_match_of_the_last_paragraph_on_trl_completions() -> None:
    completions = [
        [{"role": "assistant", "content": "The circle is red.\n\nAnswer: red"}],
        [{"role": "assistant", "content": "Answer: red\n\nThe circle is red."}],  # answer not last
        [{"role": "assistant", "content": "Answer: Red"}],  # case differs
        [{"role": "assistant", "content": "Answer: blue"}],
        "Answer: red",
    ]
    assert exact_match_reward(completions, ["red"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert len(paragraphs("a\n\nb\n\n\n\nAnswer: 3\n\n")) == 3


def test_step_clock_splits_a_step_into_its_parts() -> None:
    clock = StepClock()
    clock.current.update(generate=2.0, kawhi=0.5, ref=0.25, generate_and_score=3.0)
    clock.close(5.0)
    assert clock.steps == [{"step": 5.0, "generate": 2.0, "kawhi": 0.5, "ref": 0.25, "score": 0.25, "update": 2.0}]
    assert not clock.current  # the next step starts from zero


def record(arm: str, seed: int, accs: list[float], step_s: list[float]) -> dict:
    return {"arm": arm, "seed": seed, "beta": 0.0, "ref_from_service": False,
            "evals": [{"step": 5 * i, "accuracy": a, "paragraphs": 2.0 + i, "by_kind": {"k": a}}
                      for i, a in enumerate(accs)],
            "steps": [{"step": s, "generate": s / 2, "kawhi": s / 10, "ref": 0.0, "score": 0.0, "update": s * 0.4}
                      for s in step_s],
            "train": [{"reward": 0.5, "paragraphs": 2.0}]}


def test_seeds_aggregate_to_mean_and_min_max_and_warm_up_steps_are_left_out() -> None:
    runs = [record("kawhi", 0, [0.2, 0.4], [100.0, 1.0, 3.0]), record("kawhi", 1, [0.4, 0.8], [100.0, 2.0, 4.0])]
    assert curve(runs) == [(0, pytest.approx(0.3), 0.2, 0.4), (5, pytest.approx(0.6), 0.4, 0.8)]
    split = step_split(runs)
    assert split["step"] == 2.5 and math.isclose(split["kawhi"], 0.25)  # the 100 s first steps are out
    table = time_table(runs)
    assert "| kawhi | 0 | - | 2.50 |" in table and "10.0 %" in table
    acc = accuracy_table(runs + [record("grpo", 0, [0.2, 0.3], [1.0, 1.0])])
    assert "| kawhi | 2 | 0.300 | 0.600 [0.400, 0.800] | 0.600 | 2.00 -> 3.00 | 0.500 |" in acc
    assert "| grpo | 1 |" in acc
