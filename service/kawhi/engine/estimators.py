"""Group advantages A_g from verifier rewards (docs/method.md §1).

One group is G responses to one prompt, each with a scalar reward R_g. An estimator
turns the G rewards into G advantages; KAWHI later rescales A_g per paragraph.

Estimators (``ADVANTAGE_ESTIMATORS``; add more with ``register_advantage_estimator``):

* ``grpo`` (paper default): A_g = (R_g - mean) / (std + eps). ``std="population"``
  (ddof=0) is the paper's; ``std="unbiased"`` (ddof=1) is verl's.
* ``drgrpo``: A_g = R_g - mean (Dr.GRPO, no std).
* ``rloo``: A_g = R_g - mean of the other G-1 rewards = G/(G-1) * (R_g - mean).
* ``given``: the trainer supplies A_g itself (wire field ``advantages``); returned
  unchanged, rewards may be None.

Rules, the same for every estimator:

* The mean and std are computed on rewards centred and scaled by max |R|, so huge
  but finite rewards (1e300) give the same advantages as small ones; a result that
  still overflows (drgrpo/rloo of rewards near 1e308) raises ``InvalidRewardError``.
* A NaN/inf (or non-numeric, or None) reward or given advantage raises
  ``InvalidRewardError`` with ``.index`` = the response's index and ``.field`` =
  ``"reward"`` or ``"advantage"``.
* Rewards missing altogether (None) for an estimator other than ``given`` raises
  ``InvalidRewardError`` with ``.index = None``.
* ``rewards`` and ``given`` of different lengths raise ``ValueError``; so does
  ``given`` passed to an estimator other than ``given`` (it would be ignored).
* All rewards equal -> all advantages exactly 0 (a group with no signal). This is
  checked explicitly: the float mean of equal rewards need not equal them, and with
  ``eps=0`` the quotient would be 0/0.
* G = 1 -> advantage 0 for grpo/drgrpo/rloo (a single response has no baseline to
  compare with). For ``std="unbiased"`` the ddof=1 std of one value is undefined; it
  is taken as 0, which gives the same 0. (verl instead returns the raw reward for a
  group of one; we do not.)
* G = 0 -> an empty array.
* An unknown estimator name raises ``ValueError`` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "InvalidRewardError",
    "group_advantages",
    "register_advantage_estimator",
]

# fn(rewards (G,) | None, *, given (G,) | None, eps, std) -> advantages (G,) float64.
# Inputs arrive validated: finite float64, equal lengths.
AdvantageEstimator = Callable[..., np.ndarray]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}

STD_MODES = ("population", "unbiased")


class InvalidRewardError(ValueError):
    """A reward (or a given advantage) that cannot be used.

    ``index`` is the offending response's position in the group, or None when the
    whole list is missing; ``field`` is ``"reward"`` or ``"advantage"``, so a front
    end can point at ``/responses/{index}/reward`` or ``/advantages/{index}``.
    """

    def __init__(self, message: str, index: int | None = None, field: str = "reward"):
        super().__init__(message)
        self.index = index
        self.field = field


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register ``fn`` under ``name``. Re-registering a name with a
    different function raises ``ValueError`` (as verl's ``register_adv_est``)."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        existing = ADVANTAGE_ESTIMATORS.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered: {existing}")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def _as_finite(values: Sequence[float], field: str) -> np.ndarray:
    """(G,) float64, or InvalidRewardError naming the first bad entry."""
    if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
        raise ValueError(f"{field}s must be a 1-D sequence of numbers, got {values!r}")
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise InvalidRewardError(f"{field} {i} is not a number: {v!r}", index=i, field=field) from None
        if not np.isfinite(out[i]):
            raise InvalidRewardError(f"{field} {i} is not finite: {v!r}", index=i, field=field)
    return out


def _require_rewards(rewards: np.ndarray | None, estimator: str) -> np.ndarray:
    if rewards is None:
        raise InvalidRewardError(f"estimator {estimator!r} needs a reward for every response; got none")
    return rewards


def _no_signal(rewards: np.ndarray) -> bool:
    return rewards.size <= 1 or bool(np.all(rewards == rewards[0]))


def _centred(r: np.ndarray) -> tuple[np.ndarray, float]:
    """(R - mean) / s and the scale s = max |R|: centre, then scale, in a range where
    neither the mean nor the squares of the std can overflow (rewards near 1e308) or
    underflow (below 1e-154)."""
    scale = float(np.max(np.abs(r)))
    scaled = r / scale
    return scaled - scaled.mean(), scale


@register_advantage_estimator("grpo")
def grpo_advantages(rewards, *, given=None, eps: float = 1e-6, std: str = "population") -> np.ndarray:
    """A_g = (R_g - mean) / (std + eps); (G,) -> (G,)."""
    r = _require_rewards(rewards, "grpo")
    if _no_signal(r):
        return np.zeros_like(r)
    d, scale = _centred(r)
    sigma = float(np.sqrt(np.sum(d * d) / (d.size - (0 if std == "population" else 1))))
    return d / (sigma + eps / scale)  # = (R - mean) / (std + eps), all in units of the scale


@register_advantage_estimator("drgrpo")
def drgrpo_advantages(rewards, *, given=None, eps: float = 1e-6, std: str = "population") -> np.ndarray:
    """A_g = R_g - mean; (G,) -> (G,)."""
    r = _require_rewards(rewards, "drgrpo")
    if _no_signal(r):
        return np.zeros_like(r)
    d, scale = _centred(r)
    with np.errstate(over="ignore"):
        return d * scale  # may overflow for rewards near the float range: the caller refuses that


@register_advantage_estimator("rloo")
def rloo_advantages(rewards, *, given=None, eps: float = 1e-6, std: str = "population") -> np.ndarray:
    """A_g = R_g - mean_{g' != g} R_g' = G/(G-1) (R_g - mean); (G,) -> (G,)."""
    r = _require_rewards(rewards, "rloo")
    if _no_signal(r):
        return np.zeros_like(r)
    g = r.size
    d, scale = _centred(r)
    with np.errstate(over="ignore"):
        return d * (g / (g - 1)) * scale


@register_advantage_estimator("given")
def given_advantages(rewards, *, given=None, eps: float = 1e-6, std: str = "population") -> np.ndarray:
    """The trainer's own advantages, unchanged; (G,) -> (G,)."""
    if given is None:
        raise InvalidRewardError("estimator 'given' needs one advantage per response; got none", field="advantage")
    return given.copy()


def group_advantages(
    rewards: Sequence[float] | None,
    estimator: str = "grpo",
    *,
    eps: float = 1e-6,
    std: str = "population",
    given: Sequence[float] | None = None,
) -> np.ndarray:
    """Advantages (G,) float64 of one group; see the module docstring for the rules.

    rewards: (G,) verifier rewards, or None with ``estimator="given"``.
    given:   (G,) the trainer's advantages; only with ``estimator="given"``.
    """
    fn = ADVANTAGE_ESTIMATORS.get(estimator)
    if fn is None:
        raise ValueError(f"unknown estimator {estimator!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}")
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if given is not None and estimator != "given":
        raise ValueError(f"'given' advantages are only used by estimator='given', not {estimator!r}")

    r = None if rewards is None else _as_finite(rewards, "reward")
    a = None if given is None else _as_finite(given, "advantage")
    if r is not None and a is not None and r.size != a.size:
        raise ValueError(f"{r.size} rewards but {a.size} given advantages")
    out = np.asarray(fn(r, given=a, eps=float(eps), std=std), dtype=np.float64)
    if out.size and not np.all(np.isfinite(out)):
        source = r if r is not None else a
        worst = int(np.argmax(np.abs(source))) if source is not None else None
        raise InvalidRewardError(f"the group's advantages overflow a 64-bit float ({estimator}); scale its "
                                 "rewards down", index=worst, field="reward" if r is not None else "advantage")
    return out
