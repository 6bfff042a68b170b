"""The failure policy of the trainer integrations, and their errors and warnings.

When the service fails mid-training (a call raises, a group comes back with an error,
or a result breaks the contract, e.g. a different number of token advantages than the
trainer has tokens):

* ``on_error="raise"`` (default): raise ``KawhiIntegrationError`` — the step fails, the
  learning signal never changes behind the user's back;
* ``on_error="fallback"``: the affected responses keep the trainer's unweighted
  (uniform) advantages; every such event is counted (``FailurePolicy.fallbacks``,
  ``.fallback_rows``, ``.events``), logged at WARNING on the ``kawhi_client.integrations``
  logger and raised as a ``KawhiFallbackWarning``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("kawhi_client.integrations")

OnError = Literal["raise", "fallback"]
ON_ERROR_CHOICES = ("raise", "fallback")


class KawhiIntegrationError(RuntimeError):
    """KAWHI could not reweight a batch and the failure policy is ``on_error="raise"``
    (or the integration was misconfigured). ``__cause__`` holds the original error."""


class KawhiFallbackWarning(RuntimeWarning):
    """Some responses were trained with the unweighted advantages (``on_error="fallback"``)."""


class KawhiTokenizerWarning(RuntimeWarning):
    """The service's reference model tokenises differently from the trainer's policy: the
    token ids the trainer sends would be read as other text (wrong paragraph boundaries)."""


@dataclass(frozen=True)
class FallbackEvent:
    """One failure that made some responses keep their unweighted advantages."""

    number: int  # 1-based, in order of occurrence
    time: float  # time.time()
    reason: str  # "service call failed", "group refused", "result mismatch", "bad rollout"
    detail: str
    rows: int  # responses affected
    group_ids: tuple[str, ...] = ()


class FailurePolicy:
    """What a trainer integration does when KAWHI fails; and the counters of what it did.

    ``on_error="raise"`` (default): raise ``KawhiIntegrationError`` from the original error.
    ``on_error="fallback"``: keep the unweighted advantages for the affected responses,
    count the event (``fallbacks``), the responses (``fallback_rows``), keep the last
    ``keep_events`` events (``events``), log a WARNING and warn ``KawhiFallbackWarning``
    — once per event, never silently. ``reweighted_rows`` counts responses that did get
    KAWHI advantages. Thread-safe.
    """

    def __init__(self, on_error: OnError = "raise", *, keep_events: int = 1000) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}")
        self.on_error: OnError = on_error
        self.fallbacks = 0
        self.fallback_rows = 0
        self.reweighted_rows = 0
        self.events: collections.deque[FallbackEvent] = collections.deque(maxlen=keep_events)
        self._lock = threading.Lock()

    def failed(
        self,
        reason: str,
        detail: str,
        *,
        rows: int,
        group_ids: Sequence[str | None] = (),
        error: BaseException | None = None,
    ) -> None:
        """Apply the policy to one failure affecting ``rows`` responses.

        Raises KawhiIntegrationError under ``"raise"``; records and warns under ``"fallback"``.
        """
        message = f"KAWHI {reason}: {detail}"
        if self.on_error == "raise":
            raise KawhiIntegrationError(
                f"{message} (on_error='raise'; pass on_error='fallback' to train those responses with "
                "the unweighted advantages instead)"
            ) from error
        with self._lock:
            self.fallbacks += 1
            self.fallback_rows += rows
            event = FallbackEvent(self.fallbacks, time.time(), reason, detail, rows,
                                  tuple(str(g) for g in group_ids if g is not None))
            self.events.append(event)
            total_rows, number = self.fallback_rows, self.fallbacks
        text = (f"{message} -> {rows} response(s) keep their UNWEIGHTED advantages "
                f"(fallback #{number}; {total_rows} response(s) so far)")
        log.warning(text)
        warnings.warn(text, KawhiFallbackWarning, stacklevel=3)

    def succeeded(self, rows: int) -> None:
        with self._lock:
            self.reweighted_rows += rows

    def stats(self) -> dict[str, Any]:
        """Counters as a dict (for logging): fallbacks, fallback_rows, reweighted_rows, on_error."""
        with self._lock:
            return {"on_error": self.on_error, "fallbacks": self.fallbacks, "fallback_rows": self.fallback_rows,
                    "reweighted_rows": self.reweighted_rows}

    def __repr__(self) -> str:
        s = self.stats()
        return (f"FailurePolicy(on_error={s['on_error']!r}, fallbacks={s['fallbacks']}, "
                f"fallback_rows={s['fallback_rows']}, reweighted_rows={s['reweighted_rows']})")
