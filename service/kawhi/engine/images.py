"""Image bytes -> validated RGB image. Nothing here fetches a URL or reads a path."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image

from kawhi.engine.errors import GroupError


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be. Format, size and aspect ratio are checked from the header
    (:func:`probe_image`), before decoding, so a decompression bomb is refused without
    being expanded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 14  # one ViT patch: anything smaller carries no structure to select
    max_aspect_ratio: float = 200.0  # Qwen-VL's resize refuses more (smart_resize)
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_base64(text: str, pointer: str = "/image/data") -> bytes:
    """Strict base64 (standard alphabet; whitespace tolerated), GroupError otherwise."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise GroupError(pointer, "image data is not valid base64 (standard alphabet, padded)",
                         kind="invalid-image") from None


def probe_image(data: bytes, limits: ImageLimits = ImageLimits(), pointer: str = "/image") -> tuple[str, int, int]:
    """(format, width, height) read from the header only; GroupError when the limits refuse it."""
    if len(data) > limits.max_bytes:
        raise GroupError(pointer, f"image is {len(data)} bytes; the limit is {limits.max_bytes}", kind="too-large")
    if not data:
        raise GroupError(pointer, "image is empty", kind="invalid-image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GroupError(pointer, f"image header declares more than {limits.max_pixels} pixels "
                         "(a decompression bomb)", kind="too-large") from None
    except Exception:  # PIL raises many types for unknown or corrupt data
        raise GroupError(pointer, f"image could not be read: send PNG, JPEG or WebP bytes "
                         f"({', '.join(limits.formats)} accepted)", kind="invalid-image") from None
    if image_format not in limits.formats:
        raise GroupError(pointer, f"image format {image_format} is not accepted; use one of {list(limits.formats)}",
                         kind="invalid-image")
    if width * height > limits.max_pixels:
        raise GroupError(pointer, f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_pixels}", kind="too-large")
    if min(width, height) < limits.min_side:
        raise GroupError(pointer, f"image is {width}x{height}; each side must be at least {limits.min_side} px",
                         kind="invalid-image")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise GroupError(pointer, f"image is {width}x{height}: an aspect ratio over {limits.max_aspect_ratio:g} "
                         "cannot be tiled into patches; crop or pad it", kind="invalid-image")
    return image_format, width, height


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), pointer: str = "/image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an RGB image, enforcing ``limits``.

    Raises GroupError: ``too-large`` for too many bytes or pixels, ``invalid-image`` for
    anything undecodable or truncated, of another format, too small or too elongated.
    """
    probe_image(data, limits, pointer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise GroupError(pointer, "image refused as a decompression bomb", kind="too-large") from None
    except Exception:  # truncated or corrupt pixel data
        raise GroupError(pointer, "image could not be decoded: its data is truncated or corrupt",
                         kind="invalid-image") from None
