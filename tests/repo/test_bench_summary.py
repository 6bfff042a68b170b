"""bench.run's summary: a ratio the work done cannot produce is flagged, never a met target."""

from __future__ import annotations

from bench.run import P1_EFFICIENCY_SLACK, summary


def p1(ratio: float, flop_ratio: float = 1.6) -> dict:
    return {"p1": {"ratio": ratio, "flop_ratio": flop_ratio, "ceiling": flop_ratio * P1_EFFICIENCY_SLACK}}


def test_a_p1_ratio_above_the_physical_ceiling_is_flagged_not_met() -> None:
    out = summary(p1(56.0))  # the bare forward measured while the machine was busy
    assert out["met"]["p1_ratio"] is False
    assert "exceeds the physical ceiling 3.20" in out["implausible"]["p1_ratio"]


def test_plausible_ratios_are_judged_against_their_targets() -> None:
    assert summary(p1(0.97))["met"] == {"p1_ratio": True} and "implausible" not in summary(p1(0.97))
    assert summary(p1(0.5))["met"] == {"p1_ratio": False} and "implausible" not in summary(p1(0.5))
    assert summary(p1(3.1))["met"] == {"p1_ratio": True}  # batching gains, within the ceiling
