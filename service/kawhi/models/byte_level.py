"""Byte-level BPE helpers: the byte <-> unicode map of GPT-2-style tokenizers (all Qwen ones)
and UTF-8 decoding that maps every byte to the character holding it."""

from __future__ import annotations


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


UNICODE_TO_BYTE = {u: b for b, u in _bytes_to_unicode().items()}


def utf8_char_spans(data: bytes) -> tuple[str, list[int]]:
    """Decode ``data`` as UTF-8 (invalid bytes -> U+FFFD each) and map byte -> char index.

    Returns the text and a list of length len(data) + 1 giving, for each byte offset,
    the index of the character that starts at or contains it.
    """
    chars: list[str] = []
    byte_to_char = [0] * (len(data) + 1)
    i = 0
    while i < len(data):
        lead = data[i]
        width = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 0
        piece = data[i : i + width] if width else b""
        try:
            ch = piece.decode("utf-8") if width else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            ch, width = "\ufffd", 1
        for j in range(i, i + width):
            byte_to_char[j] = len(chars)
        chars.append(ch)
        i += width
    byte_to_char[len(data)] = len(chars)
    return "".join(chars), byte_to_char
