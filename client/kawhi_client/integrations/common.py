"""The names the trainer integrations share, gathered from the modules that define them:

* ``backends`` — ``Backend``, ``HttpBackend``, ``InProcessBackend``, ``as_backend``;
* ``policy`` — ``FailurePolicy`` (``on_error="raise" | "fallback"``), its events and the
  integrations' errors and warnings;
* ``inputs`` — a trainer's images, chat messages and tokenizer in the service's forms;
* ``reweighter`` — ``Reweighter``, ``Rollout``, ``RowResult``.

``trl.py`` and ``verl.py`` import from here. Nothing here imports torch, numpy or PIL at
import time.
"""

from __future__ import annotations

from kawhi_client.integrations.backends import Backend, HttpBackend, InProcessBackend, as_backend
from kawhi_client.integrations.inputs import (
    image_bytes,
    image_key,
    insert_image_placeholder,
    tokenizer_fingerprint,
    tokenizer_fingerprints,
    wire_messages,
)
from kawhi_client.integrations.policy import (
    ON_ERROR_CHOICES,
    FailurePolicy,
    FallbackEvent,
    KawhiFallbackWarning,
    KawhiIntegrationError,
    KawhiTokenizerWarning,
    OnError,
)
from kawhi_client.integrations.reweighter import Reweighter, Rollout, RowResult, check_options

__all__ = [
    "Backend",
    "FailurePolicy",
    "FallbackEvent",
    "HttpBackend",
    "InProcessBackend",
    "KawhiFallbackWarning",
    "KawhiIntegrationError",
    "KawhiTokenizerWarning",
    "ON_ERROR_CHOICES",
    "OnError",
    "Reweighter",
    "Rollout",
    "RowResult",
    "as_backend",
    "check_options",
    "image_bytes",
    "image_key",
    "insert_image_placeholder",
    "tokenizer_fingerprint",
    "tokenizer_fingerprints",
    "wire_messages",
]
