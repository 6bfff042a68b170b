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
    """What an image may be. Pixels are checked from the header, before decoding,
    so a decompression bomb is refused without being expanded."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 14  # one ViT patch: anything smaller carries no structure to select
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_base64(text: str, pointer: str = "/image/data") -> bytes:
    """Strict base64 (standard alphabet; whitespace tolerated), GroupError otherwise."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GroupError(pointer, f"image data is not valid base64: {exc}") from None


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), pointer: str = "/image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes into an RGB image, enforcing ``limits``.

    Raises GroupError: 413 for too many bytes or pixels, 422 for anything undecodable,
    of another format, or smaller than ``min_side``.
    """
    if len(data) > limits.max_bytes:
        raise GroupError(pointer, f"image is {len(data)} bytes; the limit is {limits.max_bytes}", status=413,
                         title="Image too large")
    if not data:
        raise GroupError(pointer, "image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            width, height = image.size
            if image_format not in limits.formats:
                raise GroupError(pointer, f"image format {image_format} is not accepted; use one of {list(limits.formats)}")
            if width * height > limits.max_pixels:
                raise GroupError(pointer, f"image is {width}x{height} = {width * height} pixels; the limit is "
                                          f"{limits.max_pixels}", status=413, title="Image too large")
            if min(width, height) < limits.min_side:
                raise GroupError(pointer, f"image is {width}x{height}; each side must be at least {limits.min_side} px")
            image.load()
    except GroupError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise GroupError(pointer, f"image refused as a decompression bomb: {exc}", status=413,
                         title="Image too large") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise GroupError(pointer, f"image could not be decoded: {type(exc).__name__}: {exc}") from None
    return image.convert("RGB")
