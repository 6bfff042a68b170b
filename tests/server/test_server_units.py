"""Small pure pieces of the server: LRU budget, pointers, key comparison, settings helpers."""

from __future__ import annotations

import pytest


def test_lru_is_bounded_in_bytes_and_evicts_least_recent() -> None:
    from kawhi.pipeline.cache import LRU

    lru = LRU(10)
    lru.set("a", b"1234", 4)
    lru.set("b", b"1234", 4)
    assert lru.get("a") == b"1234"  # a is now the most recent
    lru.set("c", b"1234", 4)  # 12 > 10: b goes
    assert lru.get("b") is None and lru.get("a") is not None and lru.get("c") is not None
    lru.set("huge", b"x" * 11, 11)  # larger than the whole budget: not stored, nothing evicted
    assert lru.get("huge") is None and len(lru) == 2 and lru.size == 8


def test_pointers_escape_and_skip_union_tags() -> None:
    from kawhi.engine.errors import loc_to_pointer
    from kawhi.errors import pointer

    assert pointer("groups", 3, "a/b", "c~d") == "/groups/3/a~1b/c~0d"
    assert loc_to_pointer(("options", "heads", "literal['preset','all']")) == "/options/heads"
    assert loc_to_pointer(("options", "heads", "list[int]", 0)) == "/options/heads/0"
    assert loc_to_pointer(("groups", 0, "image"), ()) == "/groups/0/image"
    assert loc_to_pointer(()) == ""


def test_api_keys_compare_all_keys_and_refuse_empty() -> None:
    from kawhi.pipeline.auth import key_is_valid

    keys = [b"alpha", b"beta"]
    assert key_is_valid(b"beta", keys)
    assert not key_is_valid(b"gamma", keys)
    assert not key_is_valid(b"", keys)
    assert not key_is_valid(b"", [b""])


def test_settings_helpers() -> None:
    from kawhi.settings import parse_heads, redact_url

    assert parse_heads("preset") == "preset" and parse_heads("all") == "all"
    assert parse_heads("0, 3,7") == (0, 3, 7) and parse_heads("[1,2]") == (1, 2) and parse_heads([4]) == (4,)
    with pytest.raises(ValueError):
        parse_heads("some")
    assert redact_url("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert redact_url("redis://db:6379/0") == "redis://db:6379/0"
