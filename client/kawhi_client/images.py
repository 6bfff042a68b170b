"""Image inputs of the client, without PIL: the client never decodes or re-encodes an
image (no lossy JPEG round trip). Whatever form the caller gives, the exact file bytes
go to the server, once, and the image is then referenced by the sha256 of those bytes.

Accepted forms of a group's ``image``:

* ``bytes`` / ``bytearray`` / ``memoryview`` — the encoded file (PNG/JPEG/WebP);
* a ``str`` or ``os.PathLike`` — a local file path, read by the client;
* ``{"data": "<base64>"}`` — decoded locally to the original bytes;
* ``{"path": "..."}`` — a local file path, read by the client (the server never reads paths);
* ``{"sha256": "<hex>"}`` — bytes the server already holds (sent earlier);
* an ``ImageRef`` model holding one of the above.

Anything else (a decoded PIL image, an array ...) is refused: turning pixels back into
a file would be a re-encoding, which is exactly what must not happen.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from kawhi_client.schema import ImageRef

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class ImageInputError(ValueError):
    """An image the client cannot send (the client turns it into InvalidRequest)."""

    def __init__(self, detail: str, field: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field  # the sub-field of `image` at fault ("data", "path", "sha256" or "")


@dataclass(frozen=True)
class LoadedImage:
    """An image ready to reference: its hash, and its bytes when the client holds them."""

    sha256: str
    data: bytes | None = None

    @property
    def content_type(self) -> str:
        return sniff_content_type(self.data or b"")


def sniff_content_type(data: bytes) -> str:
    """The media type of encoded image bytes, from their magic number."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def from_bytes(data: bytes) -> LoadedImage:
    if not data:
        raise ImageInputError("image bytes are empty")
    return LoadedImage(sha256_hex(data), data)


def read_path(path: str | os.PathLike[str], field: str = "path") -> LoadedImage:
    try:
        with open(os.fspath(path), "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageInputError(f"cannot read image file {os.fspath(path)!r}: {exc.strerror or exc}", field) from exc
    if not data:
        raise ImageInputError(f"image file {os.fspath(path)!r} is empty", field)
    return LoadedImage(sha256_hex(data), data)


def load_image(image: Any) -> LoadedImage:
    """Any accepted form (see the module doc) -> LoadedImage. Raises ImageInputError."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return from_bytes(bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return read_path(image, "")
    if isinstance(image, ImageRef):
        image = image.model_dump(exclude_none=True)
    if isinstance(image, dict):
        given = [k for k in ("data", "sha256", "path") if image.get(k) is not None]
        unknown = sorted(set(image) - {"data", "sha256", "path"})
        if unknown:
            raise ImageInputError(f"unknown image field(s) {unknown}; use one of 'data', 'sha256', 'path'", unknown[0])
        if len(given) != 1:
            raise ImageInputError("image needs exactly one of 'data', 'sha256' or 'path'")
        key = given[0]
        value = image[key]
        if key == "data":
            if isinstance(value, (bytes, bytearray, memoryview)):
                return from_bytes(bytes(value))
            if not isinstance(value, str):
                raise ImageInputError("image.data must be a base64 string (or bytes)", "data")
            try:
                data = base64.b64decode("".join(value.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ImageInputError(f"image data is not valid base64: {exc}", "data") from None
            if not data:
                raise ImageInputError("image data is empty", "data")
            return LoadedImage(sha256_hex(data), data)
        if key == "sha256":
            if not isinstance(value, str) or not _SHA256.match(value):
                raise ImageInputError("sha256 must be 64 hex digits", "sha256")
            return LoadedImage(value.lower(), None)
        if not isinstance(value, (str, os.PathLike)):
            raise ImageInputError("image.path must be a string", "path")
        return read_path(value, "path")
    kind = f"{type(image).__module__}.{type(image).__qualname__}"
    raise ImageInputError(
        f"unsupported image of type {kind}: pass the encoded file (bytes), a local path, "
        "{'data': base64} or {'sha256': hex}; the client never re-encodes decoded pixels"
    )


class HeldImages:
    """The image hashes a server was sent and is taken to hold (thread-safe, insertion-ordered,
    at most ``max_entries``: the oldest are forgotten first, so they are merely sent again).
    Keys are sha256 hex, or "<replica> <sha256>" where each replica holds its own images."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._keys: dict[str, None] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._keys

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            while len(self._keys) > self._max:
                del self._keys[next(iter(self._keys))]

    def discard(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)
