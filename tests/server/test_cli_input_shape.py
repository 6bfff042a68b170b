"""`kawhi reweight` wants one rollout group per line: a piped /v1/reweight body or a
pretty-printed document gets one line saying so (and how to convert), not an error record."""

from __future__ import annotations

import json

import pytest
from kawhi.cli import UserError, check_jsonl_shape

GROUP = {"image": {"path": "images/triangle.png"}, "prompt": "p", "responses": [{"text": "a", "reward": 1.0}]}


def lines_of(text: str) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(text.splitlines(keepends=True), start=1) if line.strip()]


def test_a_request_body_on_one_line_is_named() -> None:
    with pytest.raises(UserError, match=r"line 1 is a /v1/reweight request body .*jq -c '\.groups\[\]'"):
        check_jsonl_shape(lines_of(json.dumps({"groups": [GROUP, GROUP]})))


def test_a_pretty_printed_body_or_group_is_named() -> None:
    with pytest.raises(UserError, match=r"the input is a request body over \d+ lines, not one group per line"):
        check_jsonl_shape(lines_of(json.dumps({"groups": [GROUP]}, indent=2)))
    with pytest.raises(UserError, match=r"the input is one JSON document over \d+ lines"):
        check_jsonl_shape(lines_of(json.dumps(GROUP, indent=2)))


def test_jsonl_passes_even_with_a_bad_line() -> None:
    check_jsonl_shape(lines_of("\n".join([json.dumps(GROUP), "{not json", json.dumps(GROUP)])))
    check_jsonl_shape(lines_of("{not json\n" + json.dumps(GROUP)))
    check_jsonl_shape([])
