import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from kawhi.engine.weights import normalize_weights, paragraph_weights, segment_means, token_weights

PAPER = dict(temperature=0.1, smoothing=0.1, w_min=0.1, w_max=1.0)


def test_segment_means_by_hand():
    values = np.array([1.0, 3.0, 0.5, -0.5, 2.0])
    ids = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(segment_means(values, ids, 3), [2.0, 0.0, 2.0])


def test_segment_means_validation():
    with pytest.raises(ValueError):
        segment_means(np.ones(3), np.array([0, 0, 2]), 3)  # segment 1 empty
    with pytest.raises(ValueError):
        segment_means(np.ones(3), np.array([0, 1]), 2)  # length mismatch
    with pytest.raises(ValueError):
        segment_means(np.ones(2), np.array([0, 2]), 2)  # id out of range
    with pytest.raises(ValueError):
        segment_means(np.ones(2), np.array([0.0, 1.0]), 2)  # float ids
    assert segment_means(np.zeros(0), np.zeros(0, dtype=int), 0).shape == (0,)


def test_paragraph_weights_by_hand():
    # abar = [0, 0.1], T = 0.1: softmax = [1, e] / (1 + e)
    e = math.e
    p = np.array([1.0, e]) / (1.0 + e)
    wtil = 0.9 * p + 0.1 / 2
    expected = 0.1 + 0.9 * wtil
    np.testing.assert_allclose(paragraph_weights(np.array([0.0, 0.1]), **PAPER), expected, rtol=1e-12)
    # numbers, for the record: p = [0.26894, 0.73106], wtil = [0.29205, 0.70795]
    np.testing.assert_allclose(expected, [0.362843, 0.737157], atol=1e-6)


def test_softmax_is_shift_invariant_and_stable():
    a = np.array([0.2, -0.1, 0.05])
    w = paragraph_weights(a, **PAPER)
    np.testing.assert_allclose(paragraph_weights(a + 1000.0, **PAPER), w, rtol=1e-12)
    huge = paragraph_weights(np.array([0.0, 1.0]), temperature=1e-4, smoothing=0.0, w_min=0.0, w_max=1.0)
    assert np.all(np.isfinite(huge))


def test_small_temperature_approaches_argmax():
    a = np.array([0.01, 0.03, 0.02, -0.2])
    lam, w_min, w_max = 0.1, 0.1, 1.0
    onehot = np.array([0.0, 1.0, 0.0, 0.0])
    limit = w_min + (w_max - w_min) * ((1 - lam) * onehot + lam / 4)
    w = paragraph_weights(a, temperature=1e-4, smoothing=lam, w_min=w_min, w_max=w_max)
    np.testing.assert_allclose(w, limit, atol=1e-12)


def test_large_temperature_approaches_uniform():
    a = np.array([0.01, 0.03, 0.02, -0.2])
    w = paragraph_weights(a, temperature=1e6, smoothing=0.1, w_min=0.1, w_max=1.0)
    np.testing.assert_allclose(w, 0.1 + 0.9 / 4, atol=1e-6)


def test_full_smoothing_gives_equal_weights():
    w = paragraph_weights(np.array([0.5, -0.3, 0.9]), temperature=0.01, smoothing=1.0, w_min=0.2, w_max=0.8)
    np.testing.assert_allclose(w, 0.2 + 0.6 / 3)


def test_single_segment_gets_w_max():
    assert paragraph_weights(np.array([-0.7]), **PAPER).tolist() == [1.0]
    assert paragraph_weights(np.array([0.3]), temperature=5, smoothing=0.5, w_min=0.25, w_max=0.5).tolist() == [0.5]


def test_no_segments():
    assert paragraph_weights(np.zeros(0), **PAPER).shape == (0,)


def test_larger_alignment_gets_larger_weight():
    w = paragraph_weights(np.array([0.1, 0.3, 0.2]), **PAPER)
    assert w[1] > w[2] > w[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(PAPER, temperature=0.0),
        dict(PAPER, temperature=-1.0),
        dict(PAPER, temperature=float("inf")),
        dict(PAPER, smoothing=-0.1),
        dict(PAPER, smoothing=1.5),
        dict(PAPER, smoothing=float("nan")),
        dict(PAPER, w_min=1.0, w_max=0.5),
    ],
)
def test_paragraph_weights_validation(kwargs):
    with pytest.raises(ValueError):
        paragraph_weights(np.array([0.1, 0.2]), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_abar(bad):
    with pytest.raises(ValueError):
        paragraph_weights(np.array([0.1, bad]), **PAPER)


@settings(max_examples=200, deadline=None)
@given(
    abar=arrays(np.float64, st.integers(1, 12), elements=st.floats(-1, 1)),
    temperature=st.floats(1e-3, 100),
    smoothing=st.floats(0, 1),
    w_min=st.floats(-2, 2),
    width=st.floats(0, 3),
)
def test_weights_lie_in_range(abar, temperature, smoothing, w_min, width):
    w_max = w_min + width
    w = paragraph_weights(abar, temperature=temperature, smoothing=smoothing, w_min=w_min, w_max=w_max)
    assert w.shape == abar.shape
    assert np.all(w >= w_min) and np.all(w <= w_max)
    # the wtil part is a probability distribution
    if width > 1e-6:
        np.testing.assert_allclose(((w - w_min) / width).sum(), 1.0, rtol=1e-9)


def test_normalize_none_is_identity():
    w = np.array([0.2, 0.9])
    out = normalize_weights(w, np.array([3, 1]), "none")
    np.testing.assert_array_equal(out, w)
    assert out is not w


def test_normalize_mean_by_hand():
    # token-weighted mean = (0.2*3 + 0.9*1) / 4 = 0.375
    out = normalize_weights(np.array([0.2, 0.9]), np.array([3, 1]), "mean")
    np.testing.assert_allclose(out, np.array([0.2, 0.9]) / 0.375)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.01, 1.0), st.integers(1, 50)), min_size=1, max_size=10),
    st.floats(-5, 5).filter(lambda a: abs(a) > 1e-3),
)
def test_mean_normalisation_preserves_total_advantage(pairs, advantage):
    w = np.array([p[0] for p in pairs])
    n = np.array([p[1] for p in pairs])
    out = normalize_weights(w, n, "mean")
    np.testing.assert_allclose((advantage * out * n).sum(), advantage * n.sum(), rtol=1e-9)
    np.testing.assert_allclose(out / out[0], w / w[0], rtol=1e-9)  # ratios unchanged


def test_normalize_edge_cases():
    np.testing.assert_array_equal(normalize_weights(np.zeros(0), np.zeros(0), "mean"), [])
    np.testing.assert_array_equal(normalize_weights(np.array([0.5]), np.array([0]), "mean"), [0.5])
    with pytest.raises(ValueError):
        normalize_weights(np.array([0.0, 0.0]), np.array([1, 1]), "mean")
    with pytest.raises(ValueError):
        normalize_weights(np.array([0.5]), np.array([1]), "max")
    with pytest.raises(ValueError):
        normalize_weights(np.array([0.5]), np.array([1, 2]), "mean")
    with pytest.raises(ValueError):
        normalize_weights(np.array([0.5]), np.array([-1]), "mean")


def test_token_weights():
    out = token_weights(np.array([0.2, 0.9, 0.5]), np.array([0, 0, 1, 2, 2]))
    np.testing.assert_array_equal(out, [0.2, 0.2, 0.9, 0.5, 0.5])
    assert token_weights(np.array([0.3]), np.zeros(0, dtype=np.int64)).shape == (0,)
    with pytest.raises(ValueError):
        token_weights(np.array([0.2]), np.array([0, 1]))
