"""Split a response into segments (paragraphs, sentences or tokens) and give every
token to exactly one segment (docs/method.md §5).

Character spans (``split_spans``)
    Spans are half-open ``(start, end)`` character ranges (Python ``str`` indices,
    i.e. code points) that are contiguous and cover the whole text.

    * ``paragraph``: a paragraph ends after the delimiter ``"\\n\\n"`` together with
      the run of whitespace that follows it (further newlines, the next paragraph's
      indentation); the delimiter belongs to the paragraph it terminates. Only the
      exact two-character ``"\\n\\n"`` counts: ``"\\n \\n"`` or ``"\\r\\n\\r\\n"`` do
      not, as in the paper's split.
    * ``sentence``: a sentence ends after ``.``, ``!`` or ``?`` (a run of them, plus
      closing quotes/brackets) followed by whitespace, after the full-width enders
      ``。！？`` whether or not whitespace follows (CJK text puts none), and after
      every ``"\\n"``; again the trailing whitespace run belongs to the sentence.
      "3.14" is not split; abbreviations ("e.g. this") are, by design of a simple rule.
    * A span with no non-whitespace character is not a segment: leading blank text
      joins the first segment, any later blank span joins the one before it. Text
      with no content at all (empty or whitespace only) is one span ``(0, len)``, so
      there is always at least one span.

Token assignment (``segment_tokens``)
    ``token_offsets[i] = (char_start, char_end)`` into ``text``, end exclusive, as
    a fast Hugging Face tokenizer's ``return_offsets_mapping`` gives them. Starts must
    be non-decreasing; widths may be 0 (special tokens) and neighbours may overlap
    (byte-level tokens that split one multibyte character share that character).

    * A token belongs to the segment containing its first non-whitespace character
      (so " How" after "fine. " opens the new sentence and ".\\n\\n" closes the old
      paragraph); a whitespace-only token to the segment of its first character
      (a delimiter token stays with the paragraph it ends); an empty-width token
      goes with the token before it, or with the first segment if none.
    * Segment ids are forced non-decreasing (a running maximum), so every segment is
      one contiguous run of tokens.
    * A segment that receives no tokens (its text was swallowed by a token anchored
      in an earlier segment) is merged into the previous segment, or into the first
      one if it leads. Every returned segment therefore has ``token_end >
      token_start``; together they cover tokens ``[0, T)`` and characters
      ``[0, len(text))`` contiguously. Zero tokens -> ``[]``.
    * ``token`` granularity: one segment per token, char span from its start to the
      next token's start (clamped to be monotone and past the previous token's end,
      so a gap after a token belongs to it and a shared multibyte character to the
      first token holding it); the first span starts at 0, the last ends at
      ``len(text)``. Empty-width tokens are segments of their own here, possibly
      with an empty char span.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["GRANULARITIES", "Segment", "segment_tokens", "split_spans", "token_segment_index"]

GRANULARITIES = ("paragraph", "sentence", "token")

_CLOSERS = "\"'”’)\\]」』）"
_BOUNDARY = {
    "paragraph": re.compile(r"\n\n\s*"),
    "sentence": re.compile(rf"[.!?]+[{_CLOSERS}]*\s+|[。！？]+[{_CLOSERS}]*\s*|\n\s*"),
}


@dataclass(frozen=True)
class Segment:
    """Characters ``[char_start, char_end)`` and tokens ``[token_start, token_end)``."""

    char_start: int
    char_end: int
    token_start: int
    token_end: int

    def __post_init__(self) -> None:
        if not (0 <= self.char_start <= self.char_end and 0 <= self.token_start <= self.token_end):
            raise ValueError(f"invalid segment {self}")


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {list(GRANULARITIES)}")


def _has_content(text: str, start: int, end: int) -> bool:
    return bool(text[start:end].strip())


def split_spans(text: str, granularity: str = "paragraph") -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` spans covering ``text``; at least one (see module doc).

    ``token`` granularity needs token offsets and is only available through
    ``segment_tokens``.
    """
    _check_granularity(granularity)
    if granularity == "token":
        raise ValueError("token granularity needs token offsets; use segment_tokens")
    n = len(text)
    cuts = [m.end() for m in _BOUNDARY[granularity].finditer(text) if m.end() < n]
    bounds = [0, *cuts, n]
    merged: list[tuple[int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if _has_content(text, start, end):
            # A leading blank run is absorbed by starting the first segment at 0.
            merged.append((merged[-1][1] if merged else 0, end))
        elif merged:
            merged[-1] = (merged[-1][0], end)
    return merged or [(0, n)]


def _check_offsets(text: str, token_offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    n = len(text)
    out: list[tuple[int, int]] = []
    prev_start = 0
    for i, pair in enumerate(token_offsets):
        try:
            start, end = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise ValueError(f"token_offsets[{i}] must be a (start, end) pair of ints, got {pair!r}") from None
        if not 0 <= start <= end <= n:
            raise ValueError(f"token_offsets[{i}] = {(start, end)} is out of range for a text of {n} characters")
        if start < prev_start:
            raise ValueError(f"token_offsets[{i}] starts at {start}, before the previous token's start {prev_start}")
        prev_start = start
        out.append((start, end))
    return out


def _anchor(text: str, start: int, end: int) -> int:
    """The first non-whitespace character of ``text[start:end]``, else ``start``."""
    for i in range(start, end):
        if not text[i].isspace():
            return i
    return start


def _token_granularity(text: str, offsets: list[tuple[int, int]]) -> list[Segment]:
    starts = []
    floor = 0  # running max of previous starts and ends
    for i, (start, end) in enumerate(offsets):
        s = 0 if i == 0 else max(start, floor)
        starts.append(s)
        floor = max(floor, s, end)
    ends = starts[1:] + [len(text)]
    return [Segment(s, e, i, i + 1) for i, (s, e) in enumerate(zip(starts, ends))]


def segment_tokens(
    text: str, token_offsets: Sequence[tuple[int, int]], granularity: str = "paragraph"
) -> list[Segment]:
    """Segments of ``text`` with their token ranges; token_offsets (T, 2) -> M <= T segments.

    Raises ValueError for offsets out of ``[0, len(text)]``, ``start > end``, or
    decreasing starts. See the module docstring for the assignment rules.
    """
    _check_granularity(granularity)
    offsets = _check_offsets(text, token_offsets)
    if not offsets:
        return []
    if granularity == "token":
        return _token_granularity(text, offsets)

    spans = split_spans(text, granularity)
    span_starts = [s for s, _ in spans]
    counts = [0] * len(spans)
    current = 0
    for start, end in offsets:
        if end > start:
            current = max(current, bisect_right(span_starts, _anchor(text, start, end)) - 1)
        counts[current] += 1

    segments: list[Segment] = []
    token = 0
    for (start, end), count in zip(spans, counts):
        if count == 0:
            if segments:  # no tokens: fold into the previous segment
                last = segments[-1]
                segments[-1] = Segment(last.char_start, end, last.token_start, last.token_end)
            continue  # leading: the first non-empty segment starts at char 0 below
        segments.append(Segment(start if segments else 0, end, token, token + count))
        token += count
    return segments


def token_segment_index(segments: Sequence[Segment], num_tokens: int) -> np.ndarray:
    """(T,) int64 segment id of every token.

    ``segments`` must cover ``[0, num_tokens)`` contiguously with non-empty token
    ranges (as ``segment_tokens`` returns them); otherwise ValueError.
    """
    ids = np.empty(num_tokens, dtype=np.int64)
    expected = 0
    for j, seg in enumerate(segments):
        if seg.token_start != expected or seg.token_end <= seg.token_start:
            raise ValueError(f"segment {j} {seg} does not continue at token {expected} with at least one token")
        ids[seg.token_start : seg.token_end] = j
        expected = seg.token_end
    if expected != num_tokens:
        raise ValueError(f"segments cover {expected} tokens, expected {num_tokens}")
    return ids
