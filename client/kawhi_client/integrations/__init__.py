"""Trainer integrations of KAWHI: TRL's GRPO trainer and verl's PPO/GRPO trainer.

Importing this package (or ``kawhi_client``) imports neither torch, trl nor verl;
each trainer module imports its trainer when *it* is imported:

* what both share, one module each: ``backends`` (the backend protocol with its two
  implementations, ``HttpBackend`` over ``kawhi_client.Client`` and ``InProcessBackend``
  over ``kawhi.engine.Engine``), ``policy`` (the failure policy, ``on_error="raise" |
  "fallback"``), ``inputs`` (images, chat messages, tokenizer fingerprints) and
  ``reweighter`` (``Reweighter``: a trainer's rollouts in, per-token advantages out);
  ``common`` gathers their names for the trainer modules.
* ``kawhi_client.integrations.trl`` — ``KawhiGRPOTrainer``, a ``trl.GRPOTrainer`` whose
  loss sees KAWHI's ``[batch, tokens]`` advantages.
* ``kawhi_client.integrations.verl_v1`` — verl's v1 trainer (its default): one KAWHI
  request per GRPO group from the agent loop, the ``kawhi`` trainer mode, the entry point
  ``python -m kawhi_client.integrations.verl_v1``.
* ``kawhi_client.integrations.verl`` — verl's legacy trainer (deprecated by verl):
  ``KawhiRewardManager`` (reward stage) and the ``grpo_kawhi`` advantage estimator;
  ``verl_shared`` holds what both verl paths share.

See docs/integrations.md.
"""

from __future__ import annotations

from typing import Any

from kawhi_client.integrations.common import (
    Backend,
    FailurePolicy,
    FallbackEvent,
    HttpBackend,
    InProcessBackend,
    KawhiFallbackWarning,
    KawhiIntegrationError,
    KawhiTokenizerWarning,
    Reweighter,
    Rollout,
    RowResult,
    as_backend,
)

__all__ = [
    "Backend",
    "FailurePolicy",
    "FallbackEvent",
    "HttpBackend",
    "InProcessBackend",
    "KawhiFallbackWarning",
    "KawhiGRPOTrainer",
    "KawhiIntegrationError",
    "KawhiTokenizerWarning",
    "Reweighter",
    "Rollout",
    "RowResult",
    "as_backend",
]


def __getattr__(name: str) -> Any:  # lazy: importing trl costs seconds and needs torch
    if name == "KawhiGRPOTrainer":
        from kawhi_client.integrations.trl import KawhiGRPOTrainer

        return KawhiGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
