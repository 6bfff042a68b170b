"""Turn reweight results into the padded ``[batch, max_len]`` advantage array a
trainer multiplies into its per-token loss.

numpy is optional: it is imported inside the functions, and without it the same
values come back as nested lists of floats. torch is never imported; a torch mask is
read through its ``.tolist()`` / ``__array__``.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = ["decode_float32", "encode_float32", "pad_token_advantages", "token_advantage_rows",
           "token_weights_from_paragraphs"]


def encode_float32(values: Any) -> str:
    """Numbers -> base64 of their little-endian float32 bytes (the wire's ``base64`` encoding)."""
    import base64

    np = _numpy()
    if np is not None:
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    arr = array.array("f", [float(v) for v in values])
    if sys.byteorder == "big":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_float32(text: str, as_numpy: bool = False) -> Any:
    """base64 of little-endian float32 -> a list of floats (or a float32 numpy array)."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(raw) % 4:
        raise ValueError(f"{len(raw)} bytes is not a whole number of float32 values")
    np = _numpy()
    if np is not None:
        out = np.frombuffer(raw, dtype="<f4")
        return out.astype(np.float32) if as_numpy else out.tolist()
    if as_numpy:
        raise ImportError("as_numpy=True needs numpy")
    arr = array.array("f")
    arr.frombytes(raw)
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tolist()


def token_weights_from_paragraphs(response: Any, n_tokens: int | None = None) -> list[float]:
    """Per-token weights rebuilt from a response's paragraphs (for ``token_arrays=false``):
    each token gets its paragraph's weight, tokens outside every paragraph 1.0. Multiply by
    the response's ``advantage`` for its token advantages."""
    paragraphs = response.get("paragraphs") if isinstance(response, Mapping) else response.paragraphs
    spans = [(p["token_start"], p["token_end"], p["weight"]) if isinstance(p, Mapping)
             else (p.token_start, p.token_end, p.weight) for p in paragraphs]
    n = n_tokens if n_tokens is not None else max((end for _, end, _ in spans), default=0)
    out = [1.0] * n
    for start, end, weight in spans:
        out[start:end] = [float(weight)] * (min(end, n) - start)
    return out


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _is_number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, (str, bytes))


def _row(values: Any) -> list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v) for v in values]


def token_advantage_rows(results: Any) -> list[list[float]]:
    """One row of token advantages per response, groups flattened in order.

    ``results`` may be a ``ReweightResponse``, or an iterable whose items are any of:
    ``GroupResult`` (or its dict) -> one row per response; ``ResponseResult`` (or a
    dict with ``token_advantages``) -> one row; a sequence of numbers -> that row.
    A group that failed (``GroupResult.error``) has no responses and is refused.
    """
    if hasattr(results, "results") and not isinstance(results, Mapping):
        results = results.results  # ReweightResponse
    rows: list[list[float]] = []
    for n, item in enumerate(results):
        if isinstance(item, Mapping):
            error, responses, adv = item.get("error"), item.get("responses"), item.get("token_advantages")
        else:
            error = getattr(item, "error", None)
            responses = getattr(item, "responses", None)
            adv = getattr(item, "token_advantages", None)
        if error is not None:
            gid = item.get("id") if isinstance(item, Mapping) else getattr(item, "id", None)
            raise ValueError(f"item {n} (group id {gid!r}) is an error result, with no advantages: {error}")
        if responses is not None:
            for r in responses:
                ra = r.get("token_advantages") if isinstance(r, Mapping) else getattr(r, "token_advantages", None)
                if ra is None:
                    raise ValueError(f"item {n}: a response without token_advantages")
                rows.append(_row(ra))
        elif adv is not None:
            rows.append(_row(adv))
        else:
            seq = item.tolist() if hasattr(item, "tolist") else item
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
                raise TypeError(f"item {n}: expected a GroupResult, a ResponseResult or a list of numbers, "
                                f"not {type(item).__name__}")
            seq = list(seq)
            if not all(_is_number(v) for v in seq):
                raise TypeError(f"item {n}: a row must hold numbers only")
            rows.append([float(v) for v in seq])
    return rows


def _host(mask: Any) -> Any:
    """A torch tensor on any device -> CPU (without importing torch)."""
    if hasattr(mask, "detach") and hasattr(mask, "cpu"):
        return mask.detach().cpu()
    return mask


def _mask_rows(mask: Any) -> list[list[bool]]:
    mask = _host(mask)
    if hasattr(mask, "tolist"):
        mask = mask.tolist()
    rows = [list(r) for r in mask]
    width = len(rows[0]) if rows else 0
    for i, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"response_mask row {i} has {len(r)} columns, row 0 has {width}")
    return [[bool(v) for v in r] for r in rows]


def pad_token_advantages(
    results_or_lists: Any,
    max_len: int | None = None,
    *,
    response_mask: Any = None,
    pad_value: float = 0.0,
    align: Literal["left", "right"] = "left",
) -> Any:
    """A ``[batch, max_len]`` array of token advantages, one row per response.

    Rows come from ``token_advantage_rows(results_or_lists)`` (groups flattened into
    responses, in order).

    With ``response_mask`` (``[batch, L]``, numpy / torch / nested lists; nonzero = a
    response token): row ``i`` holds response ``i``'s advantages, in order, exactly at
    the positions where its mask is set, and ``pad_value`` elsewhere; ``L`` is the
    width (``max_len``, if given, must equal it). The number of advantages of each
    response must equal its mask's sum — a mismatch means the service scored a
    different tokenisation than the trainer's (send the trainer's ``token_ids``) and
    raises ValueError rather than misaligning the learning signal.

    Without a mask: rows are padded to ``max_len`` (default: the longest row), at the
    end (``align="left"``) or at the start (``align="right"``, for left-padded
    batches); a row longer than ``max_len`` raises ValueError (never truncated).

    Returns a float32 numpy array when numpy is installed, else nested lists of floats.
    """
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right', not {align!r}")
    rows = token_advantage_rows(results_or_lists)
    np = _numpy()

    if response_mask is not None:
        mask = _mask_rows(response_mask)
        if len(mask) != len(rows):
            raise ValueError(f"response_mask has {len(mask)} rows but the results hold {len(rows)} responses")
        width = len(mask[0]) if mask else (max_len or 0)
        if max_len is not None and max_len != width:
            raise ValueError(f"max_len={max_len} but response_mask is {width} wide")
        for i, (row, m) in enumerate(zip(rows, mask)):
            ones = sum(m)
            if ones != len(row):
                raise ValueError(
                    f"response {i}: {len(row)} token advantages but its mask has {ones} response tokens; "
                    "the service scored a different tokenisation (send the trainer's token_ids)"
                )
        if np is not None:
            out = np.full((len(rows), width), pad_value, dtype=np.float32)
            if rows:
                m = np.asarray(mask, dtype=bool).reshape(len(rows), width)
                out[m] = np.asarray([v for row in rows for v in row], dtype=np.float32)
            return out
        out_l = [[float(pad_value)] * width for _ in rows]
        for row, m, o in zip(rows, mask, out_l):
            it = iter(row)
            for j, on in enumerate(m):
                if on:
                    o[j] = next(it)
        return out_l

    width = max((len(r) for r in rows), default=0) if max_len is None else int(max_len)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"response {i} has {len(row)} token advantages, more than max_len={width}")
    if np is not None:
        out = np.full((len(rows), width), pad_value, dtype=np.float32)
        for i, row in enumerate(rows):
            if row:
                if align == "left":
                    out[i, : len(row)] = row
                else:
                    out[i, width - len(row):] = row
        return out
    pad = float(pad_value)
    if align == "left":
        return [row + [pad] * (width - len(row)) for row in rows]
    return [[pad] * (width - len(row)) + row for row in rows]
