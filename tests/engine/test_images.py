"""Image decoding limits: formats, sizes, bombs, corruption."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from kawhi.engine.errors import GroupError
from kawhi.engine.images import ImageLimits, decode_base64, decode_image
from PIL import Image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    image = decode_image(encode(Image.new("L", (40, 30), 128), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_other_formats_are_refused():
    with pytest.raises(GroupError, match="GIF"):
        decode_image(encode(Image.new("RGB", (40, 30)), "GIF"))


def test_huge_dimensions_are_refused_before_decoding():
    with pytest.raises(GroupError) as info:
        decode_image(png_header_only(20000, 20000))
    assert info.value.status == 413


def test_too_many_bytes_and_too_small():
    with pytest.raises(GroupError) as info:
        decode_image(b"x" * 100, ImageLimits(max_bytes=10))
    assert info.value.status == 413
    with pytest.raises(GroupError, match="at least"):
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"))


def test_truncated_and_garbage_bytes():
    data = encode(Image.new("RGB", (64, 64), "red"), "PNG")
    with pytest.raises(GroupError, match="decoded"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(GroupError):
        decode_image(b"not an image at all")
    with pytest.raises(GroupError):
        decode_image(b"")


def test_base64_is_strict():
    assert decode_base64("aGVsbG8=") == b"hello"
    with pytest.raises(GroupError) as info:
        decode_base64("not base64!!")
    assert info.value.pointer == "/image/data"
