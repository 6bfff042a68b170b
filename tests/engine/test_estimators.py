import math

import numpy as np
import pytest
from kawhi.engine.estimators import (
    ADVANTAGE_ESTIMATORS,
    InvalidRewardError,
    group_advantages,
    register_advantage_estimator,
)

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0]  # mean 0.6


def test_grpo_population_by_hand():
    # deviations 0.4, -0.6; population var = (3*0.16 + 2*0.36)/5 = 0.24
    sigma = math.sqrt(0.24)
    expected = [0.4 / (sigma + 1e-6), -0.6 / (sigma + 1e-6)]
    out = group_advantages(REWARDS)
    assert out.dtype == np.float64 and out.shape == (5,)
    np.testing.assert_allclose(out, [expected[0], expected[1], expected[1], expected[0], expected[0]], rtol=1e-12)


def test_grpo_unbiased_by_hand():
    sigma = math.sqrt(1.2 / 4)  # sum of squared deviations 1.2, ddof=1
    out = group_advantages(REWARDS, "grpo", std="unbiased", eps=0.0)
    np.testing.assert_allclose(out, np.array([0.4, -0.6, -0.6, 0.4, 0.4]) / sigma, rtol=1e-12)


def test_grpo_eps_enters_denominator():
    # rewards [0, 2]: mean 1, population std 1
    np.testing.assert_allclose(group_advantages([0.0, 2.0], eps=1.0), [-0.5, 0.5])


def test_drgrpo_by_hand():
    np.testing.assert_allclose(group_advantages([3.0, 1.0, 2.0], "drgrpo"), [1.0, -1.0, 0.0])


def test_rloo_by_hand():
    # response 0: 3 - mean(1, 2) = 1.5; response 1: 1 - 2.5 = -1.5; response 2: 2 - 2 = 0
    np.testing.assert_allclose(group_advantages([3.0, 1.0, 2.0], "rloo"), [1.5, -1.5, 0.0])


def test_given_returns_given_and_allows_no_rewards():
    out = group_advantages(None, "given", given=[0.5, -2.0, 7.0])
    np.testing.assert_array_equal(out, [0.5, -2.0, 7.0])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(group_advantages([1, 0], "given", given=[3, 4]), [3.0, 4.0])


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("std", ["population", "unbiased"])
def test_equal_rewards_and_single_response_give_zeros(estimator, std):
    for rewards in ([0.1, 0.1, 0.1], [1.0], [0.7] * 5):
        out = group_advantages(rewards, estimator, std=std, eps=0.0)
        assert np.all(out == 0.0), (rewards, out)


def test_empty_group_gives_empty():
    assert group_advantages([]).shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None, "x"])
def test_bad_reward_names_its_index(bad):
    with pytest.raises(InvalidRewardError) as info:
        group_advantages([1.0, 0.0, bad, 1.0])
    assert info.value.index == 2 and info.value.field == "reward"
    assert "2" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_given_names_its_index():
    with pytest.raises(InvalidRewardError) as info:
        group_advantages(None, "given", given=[0.0, float("nan")])
    assert info.value.index == 1 and info.value.field == "advantage"


def test_bad_reward_rejected_even_with_given():
    with pytest.raises(InvalidRewardError) as info:
        group_advantages([0.0, float("inf")], "given", given=[1.0, 2.0])
    assert info.value.index == 1


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_missing_rewards(estimator):
    with pytest.raises(InvalidRewardError) as info:
        group_advantages(None, estimator)
    assert info.value.index is None


def test_given_estimator_without_given():
    with pytest.raises(InvalidRewardError):
        group_advantages([1.0, 0.0], "given")


def test_length_mismatch():
    with pytest.raises(ValueError):
        group_advantages([1.0, 0.0], "given", given=[1.0])


def test_given_with_other_estimator_is_refused():
    with pytest.raises(ValueError, match="given"):
        group_advantages([1.0, 0.0], "grpo", given=[1.0, 2.0])


def test_unknown_estimator_lists_known():
    with pytest.raises(ValueError) as info:
        group_advantages([1.0], "ppo")
    for name in ("grpo", "drgrpo", "rloo", "given"):
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"std": "sample"}, {"eps": -1.0}, {"eps": float("nan")}])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        group_advantages([1.0, 0.0], **kwargs)


def test_non_1d_rewards():
    with pytest.raises(ValueError):
        group_advantages([[1.0, 0.0]])


def test_registry_decorator():
    name = "_test_best_of"

    @register_advantage_estimator(name)
    def best_of(rewards, *, given=None, eps=1e-6, std="population"):
        return (rewards == rewards.max()).astype(float)

    try:
        np.testing.assert_array_equal(group_advantages([1.0, 3.0, 2.0], name), [0.0, 1.0, 0.0])
        register_advantage_estimator(name)(best_of)  # same function again: fine
        with pytest.raises(ValueError):
            register_advantage_estimator(name)(lambda rewards, **kw: rewards)
    finally:
        del ADVANTAGE_ESTIMATORS[name]
