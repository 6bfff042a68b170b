"""Segment weights from per-token alignment scores (docs/method.md §5, eq. 14-17).

    abar_j = mean of alpha_t over the tokens of segment j           (segment_means)
    wtil_j = (1 - lam) softmax(abar / T)_j + lam / M                (paragraph_weights)
    w_j    = w_min + (w_max - w_min) wtil_j
    Ahat_t = A * w_{j(t)}                                           (token_weights)

With the paper's range [0.1, 1.0] every weight is <= 1, so the reweighting also
shrinks the response's mean advantage. ``normalize_weights(..., "mean")`` is the
opt-in variant that rescales the weights so their token-weighted mean is 1.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["NORMALIZE_MODES", "normalize_weights", "paragraph_weights", "segment_means", "token_weights"]

NORMALIZE_MODES = ("none", "mean")


def _check_ids(segment_ids: np.ndarray, num_segments: int) -> np.ndarray:
    ids = np.asarray(segment_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"segment_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_segments):
        raise ValueError(f"segment_ids must lie in [0, {num_segments}), got [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64, copy=False)


def segment_means(values: np.ndarray, segment_ids: np.ndarray, num_segments: int) -> np.ndarray:
    """abar: (M,) float64 mean of ``values`` (T,) over the tokens of each segment.

    ``segment_ids`` (T,) gives each token's segment in ``[0, num_segments)``. A
    segment with no tokens has no mean: ValueError (``segment_tokens`` never
    produces one).
    """
    vals = np.asarray(values, dtype=np.float64)
    ids = _check_ids(segment_ids, num_segments)
    if vals.ndim != 1 or vals.shape != ids.shape:
        raise ValueError(f"values {vals.shape} and segment_ids {ids.shape} must be equal-length 1-D arrays")
    counts = np.bincount(ids, minlength=num_segments)
    if np.any(counts == 0):
        raise ValueError(f"segment(s) {np.flatnonzero(counts == 0).tolist()} have no tokens")
    return np.bincount(ids, weights=vals, minlength=num_segments) / counts


def paragraph_weights(
    abar: np.ndarray, *, temperature: float, smoothing: float, w_min: float, w_max: float
) -> np.ndarray:
    """w: (M,) float64 weights in [w_min, w_max] from segment scores abar (M,).

    M = 0 gives an empty array; M = 1 gives ``[w_max]`` (softmax of one is 1).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    if not (math.isfinite(w_min) and math.isfinite(w_max) and w_min <= w_max):
        raise ValueError(f"need finite w_min <= w_max, got w_min={w_min}, w_max={w_max}")
    a = np.asarray(abar, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"abar must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"abar must be finite, got non-finite values at {np.flatnonzero(~np.isfinite(a)).tolist()}")
    m = a.size
    if m == 0:
        return a.copy()
    z = np.exp((a - a.max()) / temperature)
    wtil = (1.0 - smoothing) * z / z.sum() + smoothing / m
    # The clip only removes rounding (wtil can exceed 1 by an ulp), keeping the
    # documented range exact.
    return np.clip(w_min + (w_max - w_min) * wtil, w_min, w_max)


def normalize_weights(weights: np.ndarray, token_counts: np.ndarray, mode: str) -> np.ndarray:
    """(M,) weights, optionally rescaled.

    ``"none"``: unchanged (the paper). ``"mean"``: multiplied by one factor so that
    ``sum(w * n) / sum(n) == 1`` with ``n = token_counts`` (M,), so the response's
    total advantage over its tokens is preserved; weights may then exceed w_max.
    With no tokens at all the weights are returned unchanged; a token-weighted mean
    <= 0 (e.g. w_max = 0) cannot be rescaled to 1 and raises ValueError.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize mode {mode!r}; known: {list(NORMALIZE_MODES)}")
    w = np.asarray(weights, dtype=np.float64)
    n = np.asarray(token_counts, dtype=np.float64)
    if w.ndim != 1 or w.shape != n.shape:
        raise ValueError(f"weights {w.shape} and token_counts {n.shape} must be equal-length 1-D arrays")
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise ValueError("token_counts must be finite and >= 0")
    if mode == "none" or n.sum() == 0:
        return w.copy()
    mean = float(np.dot(w, n) / n.sum())
    if not mean > 0:
        raise ValueError(f"cannot mean-normalise weights whose token-weighted mean is {mean}")
    return w / mean


def token_weights(weights: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """(T,) float64 weight of each token: ``weights[segment_ids]``; weights (M,), ids (T,)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be 1-D, got shape {w.shape}")
    return w[_check_ids(segment_ids, w.size)]
