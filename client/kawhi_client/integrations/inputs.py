"""A trainer's inputs in the forms the service takes: images as encoded bytes, chat
messages with bare image placeholders, and the tokenizer's fingerprint. Nothing here
imports numpy or PIL before it is handed such an object.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import io
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

_PNG_CACHE: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
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
        import numpy as np
        from PIL import Image

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"an image array must be HxW or HxWxC uint8, not {array.dtype} {array.shape}")
        return _pil_png(Image.fromarray(array))
    raise TypeError(f"unsupported image of type {type(image).__module__}.{type(image).__qualname__}")


def image_key(data: Any) -> str:
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


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """The fingerprint the engine reports as ``tokenizer_fingerprint`` in ``/v1/info``:
    sha256 (first 16 hex) of the tokenizer's full serialisation. None when unknown."""
    blob = _tokenizer_json(tokenizer)
    return None if blob is None else hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tokenizer_json(tokenizer: Any) -> str | None:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor -> its tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    try:
        return backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    except Exception:
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
