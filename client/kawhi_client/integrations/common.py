"""What every trainer integration shares: backends, the failure policy, the reweighter.

* A **backend** answers ``reweight(groups, options) -> list[GroupResult]`` with the wire
  objects of shared/API.md. Two implementations:

  - ``HttpBackend`` — a ``kawhi_client.Client`` talking to ``kawhi serve`` (images
    uploaded once, retries, timeouts that grow with the work: see client.py);
  - ``InProcessBackend`` — a ``kawhi.engine.Engine`` inside the trainer process, no HTTP
    (for users with the memory to hold the reference model next to the policy).

* The **failure policy** says what happens when the service fails mid-training (a call
  raises, a group comes back with an error, or a result breaks the contract, e.g. a
  different number of token advantages than the trainer has tokens):

  - ``on_error="raise"`` (default): raise ``KawhiIntegrationError`` — the step fails, the
    learning signal never changes behind the user's back;
  - ``on_error="fallback"``: the affected responses keep the trainer's unweighted
    (uniform) advantages; every such event is counted (``FailurePolicy.fallbacks``,
    ``.fallback_rows``, ``.events``), logged at WARNING on the ``kawhi_client.integrations``
    logger and raised as a ``KawhiFallbackWarning``.

* ``Reweighter`` turns a trainer's rollouts (image, prompt, the trainer's own response
  token ids, the trainer's own advantage) into one ``RowResult`` per rollout: the
  per-token advantages, aligned one-to-one with the token ids sent. Rollouts that share
  an image and prompt travel as one group (the service runs their prefix once). The
  trainer's advantages are sent as the group's ``advantages`` (API.md: the service then
  only reweights), so the trainer keeps its own estimator (TRL's ``scale_rewards``,
  verl's ``norm_adv_by_std_in_grpo`` ...) and KAWHI contributes the per-paragraph weights.

Nothing here imports torch, numpy or PIL at import time.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Protocol, Sequence, runtime_checkable

from kawhi_client.schema import GroupResult, Options

__all__ = [
    "Backend",
    "FailurePolicy",
    "FallbackEvent",
    "HttpBackend",
    "InProcessBackend",
    "KawhiFallbackWarning",
    "KawhiIntegrationError",
    "KawhiTokenizerWarning",
    "OnError",
    "Reweighter",
    "Rollout",
    "RowResult",
    "as_backend",
    "image_bytes",
    "tokenizer_fingerprint",
    "wire_messages",
]

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


# ============================================================================ backends


@runtime_checkable
class Backend(Protocol):
    """Anything that reweights wire groups: ``reweight(groups, options) -> list[GroupResult]``.

    ``groups`` are API.md rollout groups as dicts, except that ``image`` may be the
    encoded file as ``bytes``; ``options`` is a dict of API options. One result per
    group, in order; a group the service refused has ``error`` set.
    """

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]: ...


class HttpBackend:
    """The KAWHI HTTP service through ``kawhi_client.Client``.

    ``client``: a ``Client``, or the service URL (``None``: ``$KAWHI_URL`` or
    http://127.0.0.1:8000), in which case ``client_kwargs`` go to ``Client`` (timeouts,
    retries, ``api_key`` ...). Requests use ``per_group_errors=True``, so one bad group
    never hides the results of the others; the policy then decides about that group.
    """

    kind = "http"

    def __init__(self, client: Any = None, **client_kwargs: Any) -> None:
        from kawhi_client.client import Client

        if client is None or isinstance(client, (str, os.PathLike)):
            client = Client(None if client is None else str(client), **client_kwargs)
        elif client_kwargs:
            raise TypeError("client_kwargs are for a Client this backend creates, not for one passed in")
        self.client = client

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        return self.client.reweight(groups, options=options or None, per_group_errors=True)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"HttpBackend({self.client.base_url!r})"


class InProcessBackend:
    """The KAWHI engine inside this process: no HTTP, no server.

    ``engine``: a loaded ``kawhi.engine.engine.Engine``; when None, one is loaded with
    ``Engine.load(model, **load_kwargs)`` (``model=None``: the embedded demo model —
    plumbing only, its advantages mean nothing). The engine is not thread-safe; calls
    are serialised by a lock.
    """

    kind = "in-process"

    def __init__(self, engine: Any = None, *, model: Any = None, **load_kwargs: Any) -> None:
        if engine is None:
            from kawhi.engine.engine import Engine

            engine = Engine.load(model, **load_kwargs)
        elif model is not None or load_kwargs:
            raise TypeError("model/load_kwargs are for an engine this backend loads, not for one passed in")
        self.engine = engine
        self._lock = threading.Lock()

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        wire = []
        for group in groups:
            image = group.get("image")
            if isinstance(image, (bytes, bytearray, memoryview)):
                group = {**group, "image": {"data": base64.b64encode(bytes(image)).decode("ascii")}}
            wire.append(group)
        with self._lock:
            return self.engine.reweight(wire, options or None)

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def __repr__(self) -> str:
        return f"InProcessBackend({getattr(self.engine, 'model_name', type(self.engine).__name__)!r})"


def as_backend(obj: Any) -> Any:
    """A backend from what a user naturally has at hand.

    * a backend (anything with ``reweight(groups, options)``) — used as is;
    * a ``kawhi_client.Client`` — wrapped in ``HttpBackend``;
    * a ``kawhi.engine.engine.Engine`` — wrapped in ``InProcessBackend``;
    * a URL string (``"http://kawhi:8000"``) — ``HttpBackend(url)``;
    * ``"in-process"`` — ``InProcessBackend()`` (the embedded demo model).
    """
    if obj is None:
        raise TypeError("a KAWHI backend is required: a URL, a kawhi_client.Client, a kawhi Engine, "
                        "HttpBackend(...) or InProcessBackend(...)")
    if isinstance(obj, (HttpBackend, InProcessBackend)):
        return obj
    if isinstance(obj, str):
        if obj in ("in-process", "inprocess", "in_process"):
            return InProcessBackend()
        if obj.startswith(("http://", "https://")):
            return HttpBackend(obj)
        raise ValueError(f"backend string {obj!r}: expected an http(s):// URL or 'in-process'")
    from kawhi_client.client import Client

    if isinstance(obj, Client):
        return HttpBackend(obj)
    module = type(obj).__module__ or ""
    if module.startswith("kawhi.engine") and hasattr(obj, "prepare") and hasattr(obj, "run"):
        return InProcessBackend(obj)
    if callable(getattr(obj, "reweight", None)):
        return obj
    raise TypeError(f"cannot use {type(obj).__name__} as a KAWHI backend")


# ============================================================================ failure policy


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
        group_ids: Sequence[Optional[str]] = (),
        error: Optional[BaseException] = None,
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


# ============================================================================ images and messages

_PNG_CACHE: "collections.OrderedDict[tuple, bytes]" = collections.OrderedDict()
_PNG_CACHE_SIZE = 64
_PNG_LOCK = threading.Lock()
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.") and hasattr(image, "tobytes") and hasattr(image, "save")


def _pil_png(image: Any) -> bytes:
    """A decoded PIL image -> PNG bytes (lossless: the pixels the trainer saw, exactly).

    Cached by the pixels' hash, so the G copies of a prompt's image that a trainer
    decodes separately are encoded once.
    """
    raw = image.tobytes()
    key = (image.mode, image.size, hashlib.blake2b(raw, digest_size=20).digest())
    with _PNG_LOCK:
        hit = _PNG_CACHE.get(key)
        if hit is not None:
            _PNG_CACHE.move_to_end(key)
            return hit
    if image.mode not in _PNG_MODES:  # CMYK, YCbCr ...: the engine converts to RGB anyway
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # PIL defaults: deterministic bytes for the same pixels
    data = buf.getvalue()
    with _PNG_LOCK:
        _PNG_CACHE[key] = data
        while len(_PNG_CACHE) > _PNG_CACHE_SIZE:
            _PNG_CACHE.popitem(last=False)
    return data


def image_bytes(image: Any) -> Any:
    """A trainer's image -> the encoded file bytes to send (or a ``{"sha256": hex}`` reference).

    Accepts: encoded bytes and file paths (sent unchanged), HF-datasets image dicts
    (``{"bytes": ..., "path": ...}``), wire dicts (``{"data": base64}``, ``{"path": ...}``,
    ``{"sha256": ...}``), decoded PIL images and HWC uint8 arrays (encoded as PNG: lossless,
    never JPEG). Raises TypeError/ValueError/OSError for anything else.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if isinstance(text, str) and text.startswith(("http://", "https://", "data:")):
            raise ValueError("image URLs are not fetched: pass the bytes, a local path or a decoded image")
        with open(text, "rb") as fh:
            return fh.read()
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:  # HF datasets' Image feature, undecoded
            return bytes(image["bytes"])
        if image.get("data") is not None:
            data = image["data"]
            return bytes(data) if isinstance(data, (bytes, bytearray)) else base64.b64decode(data, validate=True)
        if image.get("sha256") is not None:
            return {"sha256": str(image["sha256"]).lower()}
        if image.get("path") is not None:
            return image_bytes(image["path"])
        if image.get("image") is not None:  # a chat content part {"type": "image", "image": ...}
            return image_bytes(image["image"])
        raise ValueError(f"image dict with keys {sorted(image)}: expected bytes, data, path or sha256")
    if _is_pil(image):
        return _pil_png(image)
    if hasattr(image, "__array_interface__") or hasattr(image, "__array__"):
        from PIL import Image

        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"an image array must be HxW or HxWxC uint8, not {array.dtype} {array.shape}")
        return _pil_png(Image.fromarray(array))
    raise TypeError(f"unsupported image of type {type(image).__module__}.{type(image).__qualname__}")


def _image_key(data: Any) -> str:
    if isinstance(data, Mapping):
        return "sha256:" + data["sha256"]
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wire_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Trainer chat messages -> (wire messages, the image payloads their image parts held).

    Image parts (``{"type": "image", ...}``, whatever payload they carry: a PIL image
    under ``"image"``, ``"bytes"``, a ``"path"`` ...) become bare ``{"type": "image"}``
    placeholders and their payloads are returned in order (``None`` for a bare
    placeholder). Text parts are kept; string contents are kept. Video/audio parts are
    refused (ValueError): KAWHI is defined for one image.
    """
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"message {i} is not a chat message with a 'role'")
        content = message.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": message["role"], "content": content or ""})
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                parts.append({"type": "image"})
                payload = {k: v for k, v in part.items() if k != "type" and v is not None}
                images.append(payload or None)
            elif kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                raise ValueError(f"message {i} part {j}: unsupported content part type {kind!r} "
                                 "(KAWHI takes one image and text)")
        out.append({"role": message["role"], "content": parts})
    return out, images


def insert_image_placeholder(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put one ``{"type": "image"}`` before the text of the first user message (what TRL's
    ``prepare_multimodal_messages`` does for a dataset whose prompts carry no image part)."""
    out = []
    inserted = False
    for message in messages:
        if not inserted and message["role"] == "user":
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            message = {**message, "content": [{"type": "image"}, *parts]}
            inserted = True
        out.append(message)
    if not inserted:
        raise ValueError("the prompt has no user message to attach the image to")
    return out


def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """The fingerprint the engine reports as ``tokenizer_fingerprint`` in ``/v1/info``:
    sha256 (first 16 hex) of the tokenizer's full serialisation. None when unknown."""
    blob = _tokenizer_json(tokenizer)
    return None if blob is None else hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_json(tokenizer: Any) -> Optional[str]:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor -> its tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    try:
        return backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    except Exception:  # noqa: BLE001 - not a tokenizer we can serialise
        return None


def tokenizer_fingerprints(tokenizer: Any) -> set[str]:
    """The fingerprints that count as "same tokenizer": the serialisation as is, and with the
    padding/truncation state cleared (a trainer enables padding when it batches prompts,
    which changes the serialisation but not a single token id)."""
    blob = _tokenizer_json(tokenizer)
    if blob is None:
        return set()
    out = {hashlib.sha256(blob.encode()).hexdigest()[:16]}
    try:
        data = json.loads(blob)
    except ValueError:
        return out
    if isinstance(data, dict) and (data.get("padding") is not None or data.get("truncation") is not None):
        data["padding"], data["truncation"] = None, None
        # the same separators/key order tokenizers' to_str() uses for a freshly loaded tokenizer
        out.add(hashlib.sha256(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()[:16])
    return out


# ============================================================================ the reweighter


@dataclass
class Rollout:
    """One response of a trainer, as KAWHI needs it.

    ``token_ids``: the trainer's own response tokens (the service scores exactly these and
    returns one advantage per id). ``image``: any form ``image_bytes`` accepts. ``prompt``
    (a string; the image goes first) or ``messages`` (chat messages with exactly one image
    part). ``advantage``: the trainer's own advantage of this response (sent as the group's
    ``advantages``: KAWHI only reweights it). ``text``: the decoded response, for logs.
    """

    token_ids: Sequence[int]
    image: Any = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    advantage: float = 1.0
    text: str = ""
    group_id: Optional[str] = None
    error: Optional[str] = None  # set by an adapter that could not build the rollout (reported under the policy)


@dataclass
class RowResult:
    """Per-token advantages of one rollout, one per token id sent.

    ``reweighted``: True when they are KAWHI's; False when they are the uniform ones
    (``[advantage] * T``, weights 1): ``reason`` says why ("fallback: ...", "zero advantage",
    "empty response").
    """

    token_advantages: list[float]
    token_weights: list[float]
    reweighted: bool
    reason: Optional[str] = None
    paragraphs: list[Any] = field(default_factory=list)
    # the reference model's per-token log-probs / entropy, when the options asked for them
    # (None when not asked, or when this row fell back)
    ref_logprobs: Optional[list[float]] = None
    entropy: Optional[list[float]] = None

    @classmethod
    def uniform(cls, advantage: float, n: int, reason: str) -> "RowResult":
        return cls([float(advantage)] * n, [1.0] * n, False, reason)


def check_options(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """API options as a plain dict, validated now (a typo fails at construction, not mid-run)."""
    if options is None:
        return {}
    if isinstance(options, Options):
        return options.model_dump(exclude_none=True)
    return Options.model_validate(dict(options)).model_dump(exclude_none=True)


class Reweighter:
    """Rollouts in, per-token advantages out, under a failure policy.

    Args:
        backend: anything ``as_backend`` accepts (URL, Client, Engine, backend).
        options: API options for every call (``{"temperature": 0.1, "normalize": "mean"}``).
        on_error: ``"raise"`` or ``"fallback"`` (see ``FailurePolicy``); ignored when
            ``policy`` is given.
        policy: a ``FailurePolicy`` to share (e.g. across trainers).
        skip_zero_advantage: responses whose advantage is exactly 0 are not sent: their
            token advantages are 0 whatever the weights (this is exact, not a fallback).
            Ignored when the options ask for reference log-probs or entropy (every row needs them).
        max_group_size: rollouts sharing an image and prompt are sent as groups of at
            most this many responses (the service's default limit is 64).
    """

    def __init__(
        self,
        backend: Any,
        *,
        options: Optional[Mapping[str, Any]] = None,
        on_error: OnError = "raise",
        policy: Optional[FailurePolicy] = None,
        skip_zero_advantage: bool = True,
        max_group_size: int = 32,
    ) -> None:
        self.backend = as_backend(backend)
        self.options = check_options(options)
        self.policy = policy if policy is not None else FailurePolicy(on_error)
        self.skip_zero_advantage = skip_zero_advantage
        if max_group_size < 1:
            raise ValueError("max_group_size must be >= 1")
        self.max_group_size = max_group_size

    @property
    def on_error(self) -> OnError:
        return self.policy.on_error

    @property
    def wants_ref_logprobs(self) -> bool:
        """Whether the options ask the service for reference log-probs or entropy."""
        return bool(self.options.get("return_ref_logprobs") or self.options.get("return_entropy"))

    def check_tokenizer(self, tokenizer: Any) -> Optional[bool]:
        """Compare the trainer's tokenizer with the service's (``tokenizer_fingerprint`` of
        ``info()``). Returns True (same), False (different: logged and warned with
        ``KawhiTokenizerWarning``, since different serialisations may still agree on the
        ids actually used) or None (not known: no ``info``, or the service unreachable)."""
        info = getattr(self.backend, "info", None)
        local = tokenizer_fingerprints(tokenizer)
        if not callable(info) or not local:
            return None
        try:
            remote = info().get("tokenizer_fingerprint")
        except Exception as exc:  # noqa: BLE001 - the reweight call reports service failures
            log.debug("KAWHI tokenizer check skipped: %s", exc)
            return None
        if not remote:
            return None
        if remote not in local:
            text = (f"KAWHI: the service's tokenizer (fingerprint {remote}) differs from the trainer's "
                    f"({', '.join(sorted(local))}); "
                    "the service reads the trainer's token ids with its own vocabulary, so paragraph boundaries "
                    "may be wrong. Serve the policy's initial model (or one with the same tokenizer).")
            log.warning(text)
            warnings.warn(text, KawhiTokenizerWarning, stacklevel=2)
            return False
        return True

    def reweight(self, rollouts: Sequence[Rollout]) -> list[RowResult]:
        """One RowResult per rollout, in order; applies the failure policy to every failure."""
        results: list[Optional[RowResult]] = [None] * len(rollouts)
        buckets: dict[tuple[str, str], list[int]] = {}
        payloads: dict[str, Any] = {}
        for i, r in enumerate(rollouts):
            n = len(r.token_ids)
            if n == 0:
                results[i] = RowResult([], [], False, "empty response",
                                       ref_logprobs=[] if self.options.get("return_ref_logprobs") else None,
                                       entropy=[] if self.options.get("return_entropy") else None)
                continue
            if not math.isfinite(float(r.advantage)):
                self.policy.failed("bad rollout", f"rollout {i}: advantage {r.advantage!r} is not finite", rows=1)
                results[i] = RowResult.uniform(r.advantage, n, "fallback: bad rollout")
                continue
            if self.skip_zero_advantage and not self.wants_ref_logprobs and float(r.advantage) == 0.0:
                results[i] = RowResult.uniform(0.0, n, "zero advantage")
                continue
            try:
                if r.error is not None:
                    raise ValueError(r.error)
                if r.image is None:
                    raise ValueError("no image")
                data = image_bytes(r.image)
                if (r.prompt is None) == (r.messages is None):
                    raise ValueError("a rollout needs exactly one of prompt or messages")
                prompt_key = r.prompt if r.messages is None else json.dumps(r.messages, sort_keys=True, default=str)
            except (TypeError, ValueError, OSError) as exc:
                self.policy.failed("bad rollout", f"rollout {i}: {exc}", rows=1, error=exc)
                results[i] = RowResult.uniform(r.advantage, n, f"fallback: bad rollout ({exc})")
                continue
            key = _image_key(data)
            payloads[key] = data
            buckets.setdefault((key, prompt_key), []).append(i)

        groups: list[dict[str, Any]] = []
        members: list[list[int]] = []
        for (key, _), rows in buckets.items():
            for start in range(0, len(rows), self.max_group_size):
                chunk = rows[start:start + self.max_group_size]
                first = rollouts[chunk[0]]
                group: dict[str, Any] = {
                    "image": payloads[key],
                    "responses": [{"text": rollouts[i].text or "", "token_ids": [int(t) for t in rollouts[i].token_ids]}
                                  for i in chunk],
                    "advantages": [float(rollouts[i].advantage) for i in chunk],
                }
                if first.group_id is not None:
                    group["id"] = str(first.group_id)
                if first.messages is not None:
                    group["messages"] = first.messages
                else:
                    group["prompt"] = first.prompt
                groups.append(group)
                members.append(chunk)

        if groups:
            self._call(groups, members, rollouts, results)
        return [r for r in results]  # type: ignore[misc]

    def _call(self, groups: list[dict[str, Any]], members: list[list[int]], rollouts: Sequence[Rollout],
              results: list[Optional[RowResult]]) -> None:
        all_rows = [i for chunk in members for i in chunk]
        try:
            answers = self.backend.reweight(groups, dict(self.options))
            answers = [a if isinstance(a, GroupResult) else GroupResult.model_validate(a) for a in answers]
            if len(answers) != len(groups):
                raise ValueError(f"{len(answers)} results for {len(groups)} groups")
        except Exception as exc:  # the service failed: the policy decides
            ids = [g.get("id") for g in groups]
            self.policy.failed("service call failed", f"{type(exc).__name__}: {exc}", rows=len(all_rows),
                               group_ids=ids, error=exc)
            for i in all_rows:
                results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                               f"fallback: {type(exc).__name__}")
            return
        ok = 0
        for group, chunk, answer in zip(groups, members, answers):
            if answer.error is not None:
                p = answer.error
                where = f" at {p.pointer}" if p.pointer else ""
                self.policy.failed("group refused", f"{p.status} {p.title}{where}: {p.detail}", rows=len(chunk),
                                   group_ids=[group.get("id")])
                for i in chunk:
                    results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                                   f"fallback: {p.status} {p.title}")
                continue
            if len(answer.responses) != len(chunk):
                self.policy.failed("result mismatch", f"{len(answer.responses)} responses for {len(chunk)} sent",
                                   rows=len(chunk), group_ids=[group.get("id")])
                for i in chunk:
                    results[i] = RowResult.uniform(rollouts[i].advantage, len(rollouts[i].token_ids),
                                                   "fallback: result mismatch")
                continue
            for i, response in zip(chunk, answer.responses):
                n = len(rollouts[i].token_ids)
                adv, w = list(response.token_advantages), list(response.token_weights)
                problem = None
                if len(adv) != n or len(w) != n:
                    problem = (f"{len(adv)} token advantages / {len(w)} weights for {n} token ids sent "
                               "(the service scored a different tokenisation)")
                elif not all(math.isfinite(v) for v in adv) or not all(math.isfinite(v) for v in w):
                    problem = "non-finite token advantages"
                else:
                    problem = self._ref_problem(response, n)
                if problem is not None:
                    self.policy.failed("result mismatch", f"rollout {i}: {problem}", rows=1,
                                       group_ids=[group.get("id")])
                    results[i] = RowResult.uniform(rollouts[i].advantage, n, "fallback: result mismatch")
                    continue
                results[i] = RowResult(adv, w, True, None, list(response.paragraphs),
                                       _floats(response.ref_logprobs), _floats(response.entropy))
                ok += 1
        self.policy.succeeded(ok)

    def _ref_problem(self, response: Any, n: int) -> Optional[str]:
        """What is wrong with the reference log-probs / entropy the options asked for, if anything."""
        for key in ("return_ref_logprobs", "return_entropy"):
            if not self.options.get(key):
                continue
            name = "ref_logprobs" if key == "return_ref_logprobs" else "entropy"
            values = getattr(response, name, None)
            if values is None or len(values) != n:
                return f"{0 if values is None else len(values)} {name} for {n} token ids sent"
            if not all(math.isfinite(v) for v in values):
                return f"non-finite {name}"
        return None

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def _floats(values: Optional[Sequence[float]]) -> Optional[list[float]]:
    return None if values is None else [float(v) for v in values]
