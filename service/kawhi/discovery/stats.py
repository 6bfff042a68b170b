"""The decision rule of ``kawhi heads discover``, in one place.

Per item i and tested head h (log-likelihoods in nats per answer token, see
:mod:`kawhi.discovery.scoring`):

* ``L_i`` / ``B_i``: the gold answer's log-likelihood with the image / with a blank
  grey image of the same size, nothing masked; ``gain_i = L_i - B_i`` is what the
  image adds;
* ``drop_i = L_i - L_i^h`` (h masked in every layer), ``blank_drop_i = B_i - B_i^h``;
* ``vision_drop_i = drop_i - blank_drop_i``: how much more the head matters with the
  image than without it.

h is **vision-critical** when, with ``tau = threshold * mean(gain)``:

1. the image helps at all: the interval of ``mean(gain)`` lies above 0;
2. ``mean(drop) >= tau`` and ``mean(vision_drop) >= tau`` (masking h removes at least
   ``threshold`` of what the image adds, default 5 %; the paper's MME rule, 50-100 of
   ~2300 points, is a drop of 2-4 %);
3. the bootstrap confidence intervals of both means exclude zero (their lower ends are
   above 0). A head that matters as much without the image (a text head) fails 2-3.

The intervals are percentile bootstrap over items, Bonferroni-corrected for the
number of heads tested: each is a (1 - (1 - confidence) / n_tested) interval, so the
chance that any tested head passes by noise alone stays below 1 - confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci": [self.low, self.high]}


def bootstrap_mean(values: np.ndarray, level: float, resamples: int, rng: np.random.Generator) -> Interval:
    """Mean of ``values`` (N,) and its two-sided percentile bootstrap interval at ``level``."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return Interval(mean, mean, mean)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // values.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, values.size, size=(stop - start, values.size))
        means[start:stop] = values[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(mean, float(low), float(high))


@dataclass(frozen=True)
class HeadDecision:
    head: int
    drop: Interval
    blank_drop: Interval
    vision_drop: Interval
    critical: bool


def decide(head: int, image: np.ndarray, blank: np.ndarray, image_masked: np.ndarray, blank_masked: np.ndarray,
           *, tau: float, gain_positive: bool, level: float, resamples: int, seed: int) -> HeadDecision:
    """The rule of the module doc for one head; all arrays (N,) log-likelihoods."""
    drop = image - image_masked
    blank_drop = blank - blank_masked
    rng = np.random.default_rng([seed, head])
    d = bootstrap_mean(drop, level, resamples, rng)
    b = bootstrap_mean(blank_drop, level, resamples, rng)
    v = bootstrap_mean(drop - blank_drop, level, resamples, rng)
    critical = bool(gain_positive and d.mean >= tau and v.mean >= tau and d.low > 0 and v.low > 0)
    return HeadDecision(head, d, b, v, critical)
