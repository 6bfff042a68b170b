"""Step 1, parse: bytes -> a checked JSON document -> wire objects, every error with a pointer.

JSON is refused as ``malformed-json`` (400) for invalid UTF-8 or syntax and a document
nested deeper than ``MAX_DEPTH`` (TEI's limit); as ``validation`` (422), with the
pointer of the value, for NaN/Infinity literals, numbers that overflow to infinity and
strings holding lone surrogates (JSON's ``\\ud800`` escapes) -- values no tokenizer or
estimator may see. In-process groups get the same walk, so the answers agree.
Wire models are validated in strict mode: ``"yes"`` is not a boolean, ``"1.0"`` is not
a number, ``1.5`` is not a token id.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kawhi_client.schema import Options, RolloutGroup
from pydantic import ValidationError

from kawhi.engine.errors import GroupError, loc_to_pointer, validation_message
from kawhi.errors import KawhiError, pointer

MAX_DEPTH = 128
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Bad:
    """A JSON value that parsed but must not be used (found again by the value walk)."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


NOT_FINITE = "the number is not finite (NaN, Infinity or beyond the 64-bit float range); send a finite number"


def _float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Bad(NOT_FINITE)


def _constant(name: str) -> Any:
    return _Bad(NOT_FINITE)


def parse_json(body: bytes, content_type: str | None = "application/json") -> Any:
    """The checked document of a JSON body (KawhiError otherwise)."""
    if content_type is not None:
        ctype = content_type.split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            shown = ctype or "no Content-Type"
            raise KawhiError("unsupported-media-type", f"send Content-Type: application/json, not {shown[:60]}")
    if not body:
        raise KawhiError("malformed-json", "the request body is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KawhiError("malformed-json", f"the body is not valid UTF-8 (byte {exc.start})") from None
    return loads_checked(text)


def loads_checked(text: str) -> Any:
    """json.loads with the checks of this module (KawhiError ``malformed-json``)."""
    try:
        doc = json.loads(text, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise KawhiError("malformed-json", f"the document is nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise KawhiError("malformed-json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except ValueError:  # an integer literal of more digits than Python converts (4300)
        raise KawhiError("malformed-json", "the body holds a number with too many digits") from None
    return doc


def check_values(doc: Any, prefix: Sequence[Any] = (), *, depth: int = 0) -> None:
    """Depth, non-finite numbers and lone surrogates anywhere in ``doc`` (iterative walk).

    depth: how deep ``doc`` sits in its document (a group of a request: 2).
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, tuple(prefix))]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise KawhiError("validation", "the string holds a lone UTF-16 surrogate, which is not "
                                 "a character; send valid Unicode", pointer(*path))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise KawhiError("validation", NOT_FINITE, pointer(*path))
        elif isinstance(value, _Bad):
            raise KawhiError("validation", value.why, pointer(*path))
        elif isinstance(value, (dict, list)):
            if len(path) - len(prefix) + depth >= MAX_DEPTH:
                raise KawhiError("malformed-json", f"the document is nested deeper than {MAX_DEPTH} levels",
                                 pointer(*path))
            items: Iterable[tuple[Any, Any]] = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise KawhiError("validation", "a member name holds a lone UTF-16 surrogate",
                                     pointer(*path))
                if isinstance(item, (str, float, dict, list, _Bad)):
                    stack.append((item, path + (key,)))


# ---------------------------------------------------------------------- wire objects


@dataclass
class ParsedRequest:
    """A request after parsing: the groups that validated, each bad group's error.

    ``errors`` pointers are relative to the group; ``group_prefix`` says whether the
    caller's document names groups ``/groups/<i>`` (a wire request) or not (a list of
    groups in-process, one group per CLI line).
    """

    groups: list[RolloutGroup | None]
    ids: list[str | None]
    options: dict[str, Any] = field(default_factory=dict)
    per_group_errors: bool = True
    errors: dict[int, KawhiError] = field(default_factory=dict)
    group_prefix: bool = True
    encoding_format: str = "float"  # how the answer's per-token arrays travel (kawhi.server.encoding)
    token_arrays: bool = True

    def prefix(self, index: int) -> str:
        return pointer("groups", index) if self.group_prefix else ""


def validation_error(exc: ValidationError | Iterable[Mapping[str, Any]], prefix: Sequence[Any] = ()) -> KawhiError:
    """A pydantic ValidationError -> one ``validation`` error at the first error's location.

    Every error is also listed in the ``errors`` extension as ``{pointer, detail}``.
    """
    errors = list(exc.errors() if isinstance(exc, ValidationError) else exc)
    listed = [{"pointer": loc_to_pointer(e.get("loc", ()), prefix), "detail": validation_message(e)} for e in errors]
    first = listed[0] if listed else {"pointer": pointer(*prefix), "detail": "invalid request"}
    detail = first["detail"]
    if len(listed) > 1:
        detail += f" (and {len(listed) - 1} more error(s), see 'errors')"
    return KawhiError("validation", detail, first["pointer"], errors=listed)


def _group_id(raw: Any) -> str | None:
    if isinstance(raw, RolloutGroup):
        return raw.id
    if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
        return raw["id"]
    return None


def parse_group(raw: Any, *, checked: bool = False, depth: int = 0) -> RolloutGroup:
    """One group (a mapping or a RolloutGroup), strict; GroupError relative to the group.

    checked: the values were already walked by :func:`check_values` (a parsed body).
    """
    if isinstance(raw, RolloutGroup):
        raw = raw.model_dump(exclude_none=True)
    if not checked:
        check_values(raw, depth=depth)
    image = raw.get("image") if isinstance(raw, Mapping) else None
    if isinstance(image, Mapping) and "url" in image:  # not a wire field, but what docs/server.md promises for it
        raise GroupError("/image/url", "a URL is never fetched; send 'data' (base64) or 'sha256'",
                         kind="path-not-allowed")
    try:
        return RolloutGroup.model_validate(raw, strict=True)
    except ValidationError as exc:
        err = validation_error(exc)
        raise GroupError(err.pointer, err.detail, kind="validation", errors=err.extra["errors"]) from None


def parse_options(raw: Any) -> dict[str, Any]:
    """Wire options (None, a mapping or an Options) -> the set ones; KawhiError at /options/..."""
    if raw is None:
        return {}
    if isinstance(raw, Options):
        raw = raw.model_dump(exclude_none=True)
    try:
        return Options.model_validate(raw, strict=True).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise validation_error(exc, ("options",)) from None


def parse_request(doc: Any) -> ParsedRequest:
    """A wire request document (``{"groups": [...], "options": ..., "per_group_errors": ...}``)."""
    if not isinstance(doc, dict):
        raise KawhiError("validation", "the request must be a JSON object with 'groups'", "")
    check_values({k: v for k, v in doc.items() if k != "groups"})
    unknown = sorted(set(doc) - {"groups", "options", "per_group_errors", "encoding_format", "token_arrays"})
    if unknown:
        raise KawhiError("validation", "unknown member (extra inputs are not permitted)", pointer(unknown[0]))
    per_group = doc.get("per_group_errors", False)
    if not isinstance(per_group, bool):
        raise KawhiError("validation", "per_group_errors must be true or false", "/per_group_errors")
    raws = doc.get("groups")
    if not isinstance(raws, list):
        raise KawhiError("validation", "groups must be a list of rollout groups", "/groups")
    if not raws:
        raise KawhiError("validation", "groups must hold at least one rollout group", "/groups")
    encoding = doc.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise KawhiError("validation", "encoding_format must be 'float' or 'base64'", "/encoding_format")
    arrays = doc.get("token_arrays", True)
    if not isinstance(arrays, bool):
        raise KawhiError("validation", "token_arrays must be true or false", "/token_arrays")
    options = parse_options(doc.get("options"))
    parsed = parse_groups(raws, options, per_group_errors=per_group, group_prefix=True)
    parsed.encoding_format, parsed.token_arrays = encoding, arrays
    return parsed


def parse_groups(raws: Sequence[Any], options: Mapping[str, Any] | None = None, *, per_group_errors: bool = True,
                 group_prefix: bool = False) -> ParsedRequest:
    """Groups (mappings or RolloutGroups) one by one; a bad group is kept as its error.

    Without per-group errors the first bad group's error is raised, placed.
    """
    out = ParsedRequest([], [], dict(options or {}), per_group_errors, {}, group_prefix)
    for i, raw in enumerate(raws):
        out.ids.append(_group_id(raw))
        try:
            out.groups.append(parse_group(raw, depth=2 if group_prefix else 0))
        except KawhiError as exc:
            if not per_group_errors:
                raise exc.placed(out.prefix(i)) from None
            out.groups.append(None)
            out.errors[i] = exc
    return out
