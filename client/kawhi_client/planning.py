"""Request planning, pure: check and serialise the caller's groups, estimate their work,
pack them into requests under the server's limits, and put the answers back together
in input order (with error pointers rewritten to index the caller's list). No I/O.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kawhi_client.errors import InvalidRequest, KawhiHTTPError, ProtocolError, client_problem
from kawhi_client.images import ImageInputError, LoadedImage, load_image
from kawhi_client.routing import routing_key
from kawhi_client.schema import GroupResult, Options, Problem, ReweightResponse, RolloutGroup, Usage

GroupLike = RolloutGroup | Mapping[str, Any]
OptionsLike = Options | Mapping[str, Any] | None

IMAGE_TOKENS_ESTIMATE = 1280  # visual tokens assumed per image when estimating work


def _text_tokens(text: str) -> int:
    # generous: byte-level BPE tokens average ~4 bytes of English; assume 2
    return len(text.encode("utf-8", "surrogatepass")) // 2 + 1


def estimate_tokens(group: Mapping[str, Any]) -> int:
    """A generous estimate of the tokens the server processes for one wire group
    (prefix + responses); used for timeouts and for packing requests under
    ``max_request_tokens`` (a request the server still finds too large is split)."""
    n = IMAGE_TOKENS_ESTIMATE
    if group.get("prompt") is not None:
        n += _text_tokens(str(group["prompt"]))
    if group.get("messages") is not None:
        n += _text_tokens(json.dumps(group["messages"], default=str))
    for r in group.get("responses") or ():
        ids = r.get("token_ids")
        n += len(ids) if ids is not None else _text_tokens(str(r.get("text", "")))
    return n


def plan_chunks(
    sizes: Sequence[tuple[int, int]],
    *,
    max_groups: int,
    max_bytes: int,
    max_tokens: int,
    overhead: int = 0,
) -> list[list[int]]:
    """Pack items (``(json_bytes, tokens)`` each), in order, into runs that respect
    every limit; returns lists of item positions. An item too large on its own gets a
    run of its own (the server then names the limit it breaks)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    nbytes, ntokens = overhead, 0
    for i, (b, t) in enumerate(sizes):
        if cur and (len(cur) + 1 > max_groups or nbytes + b + 1 > max_bytes or ntokens + t > max_tokens):
            chunks.append(cur)
            cur, nbytes, ntokens = [], overhead, 0
        cur.append(i)
        nbytes += b + 1
        ntokens += t
    if cur:
        chunks.append(cur)
    return chunks


def build_body(group_jsons: Sequence[bytes], options_json: bytes | None, per_group_errors: bool,
               wire: bytes = b"") -> bytes:
    """The ``POST /v1/reweight`` body from already-serialised groups (``wire``: from ``wire_fields``)."""
    parts = [b'{"groups":[', b",".join(group_jsons), b"]"]
    if options_json is not None:
        parts += [b',"options":', options_json]
    if per_group_errors:
        parts.append(b',"per_group_errors":true')
    parts.append(wire)
    parts.append(b"}")
    return b"".join(parts)


def body_overhead(options_json: bytes | None, per_group_errors: bool, wire: bytes = b"") -> int:
    return len(build_body([], options_json, per_group_errors, wire))


def wire_fields(encoding_format: str = "float", token_arrays: bool = True) -> bytes:
    """The request fields choosing how per-token arrays come back (validated here, not on the server).

    ``encoding_format="base64"``: little-endian float32 in base64 (about 5.3 bytes per value
    instead of ~19), decoded back to lists by ``ResponseResult``; ``token_arrays=False``: no
    per-token arrays at all (the paragraphs carry spans and weights)."""
    if encoding_format not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', not {encoding_format!r}")
    parts = [b""]
    if encoding_format != "float":
        parts.append(b'"encoding_format":"' + encoding_format.encode() + b'"')
    if not token_arrays:
        parts.append(b'"token_arrays":false')
    return b",".join(parts) if len(parts) > 1 else b""


def dumps_json(obj: Any) -> bytes:
    # allow_nan: a NaN/inf reward is sent as such (the service has a rule for it);
    # pydantic's JSON mode would silently turn it into null.
    return json.dumps(obj, allow_nan=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_or_none(content: bytes) -> Any:
    """A small JSON answer (readiness, info, an upload's hash) read leniently: None when
    it is empty or not JSON."""
    try:
        return json.loads(content) if content else None
    except (ValueError, UnicodeDecodeError):
        return None


GROUP_POINTER = re.compile(r"^/groups/(\d+)(?=/|$)")


def remap_pointer(ptr: str | None, indices: Sequence[int]) -> str | None:
    """``/groups/k/...`` of a sub-request -> ``/groups/indices[k]/...`` of the caller's list."""
    if not ptr:
        return ptr
    m = GROUP_POINTER.match(ptr)
    if not m:
        return ptr
    k = int(m.group(1))
    if k >= len(indices):
        return ptr
    return f"/groups/{indices[k]}{ptr[m.end():]}"


def remap_problem(problem: Problem, indices: Sequence[int]) -> Problem:
    data = problem.model_dump()
    data["pointer"] = remap_pointer(problem.pointer, indices)
    errs = data.get("errors")
    if isinstance(errs, list):
        data["errors"] = [
            {**e, "pointer": remap_pointer(e.get("pointer"), indices)} if isinstance(e, dict) else e for e in errs
        ]
    return Problem.model_validate(data)


def remap_error(err: KawhiHTTPError, indices: Sequence[int]) -> KawhiHTTPError:
    err.problem = remap_problem(err.problem, indices)
    err.args = (err._message(),)
    return err


_TYPE_TAG = re.compile(r"^[a-z_-]+\[.*\]$")


def _loc_pointer(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, str) and _TYPE_TAG.match(part):
            continue  # a union member's name, not a field of the document
        out += "/" + str(part).replace("~", "~0").replace("/", "~1")
    return out


def validation_problem(exc: ValidationError, prefix: str) -> Problem:
    errors = exc.errors()
    listed = [
        {"pointer": _loc_pointer(prefix, e.get("loc", ())), "detail": str(e.get("msg", "")).removeprefix("Value error, ")}
        for e in errors
    ]
    first = listed[0] if listed else {"pointer": prefix, "detail": "invalid value"}
    detail = first["detail"]
    if len(listed) > 1:
        detail += f" (and {len(listed) - 1} more error(s), see 'errors')"
    return client_problem(detail, first["pointer"], errors=listed)


def options_json(options: OptionsLike = None, overrides: Mapping[str, Any] | None = None) -> bytes | None:
    """Options (model, dict and/or keyword overrides) -> their JSON, or None when empty.
    Raises InvalidRequest (pointer ``/options/<name>``) for an unknown or invalid option."""
    base: dict[str, Any] = {}
    if isinstance(options, Options):
        base = options.model_dump(exclude_none=True)
    elif options is not None:
        base = dict(options)
    base.update({k: v for k, v in (overrides or {}).items()})
    base = {k: v for k, v in base.items() if v is not None}
    if not base:
        return None
    try:
        model = Options.model_validate(base)
    except ValidationError as exc:
        raise InvalidRequest(validation_problem(exc, "/options"), attempts=0) from None
    return dumps_json(model.model_dump(mode="python", exclude_none=True))


@dataclass
class PreparedGroup:
    """One group ready to send: its wire JSON (image by hash) and estimates."""

    index: int
    id: str | None
    sha256: str
    json: bytes
    tokens: int
    route: str = ""  # the group's routing key (kawhi_client.routing)


def prepare_groups(
    groups: Sequence[GroupLike], per_group_errors: bool
) -> tuple[list[PreparedGroup | None], dict[int, GroupResult], dict[str, LoadedImage]]:
    """Validate every group and load its image.

    Returns (prepared groups, with None where a group failed; a GroupResult carrying the
    error of each failed group; the images by sha256). A failure raises InvalidRequest
    unless ``per_group_errors``.
    """
    prepared: list[PreparedGroup | None] = []
    failed: dict[int, GroupResult] = {}
    images: dict[str, LoadedImage] = {}
    for i, g in enumerate(groups):
        prefix = f"/groups/{i}"
        raw: Any = None
        try:
            if isinstance(g, RolloutGroup):
                raw = g.model_dump(exclude_unset=True)
            elif isinstance(g, Mapping):
                raw = dict(g)
            else:
                raise InvalidRequest(
                    client_problem(f"a group must be a RolloutGroup or a dict, not {type(g).__name__}", prefix),
                    attempts=0,
                )
            if raw.get("image") is None:
                raise InvalidRequest(client_problem("the group has no image", prefix + "/image"), attempts=0)
            try:
                img = load_image(raw["image"])
            except ImageInputError as exc:
                ptr = prefix + "/image" + (f"/{exc.field}" if exc.field else "")
                raise InvalidRequest(client_problem(exc.detail, ptr), attempts=0) from exc
            raw["image"] = {"sha256": img.sha256}
            try:
                model = RolloutGroup.model_validate(raw)
            except ValidationError as exc:
                raise InvalidRequest(validation_problem(exc, prefix), attempts=0) from None
            wire = model.model_dump(mode="python", exclude_unset=True)
            wire["image"] = {"sha256": img.sha256}
        except InvalidRequest as err:
            if not per_group_errors:
                raise
            gid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            failed[i] = GroupResult(id=gid, error=err.problem)
            prepared.append(None)
            continue
        if img.sha256 not in images or images[img.sha256].data is None:
            images[img.sha256] = img
        route = routing_key(img.sha256, wire.get("prompt"), wire.get("messages"))
        prepared.append(PreparedGroup(i, model.id, img.sha256, dumps_json(wire), estimate_tokens(wire), route))
    return prepared, failed, images


def merge_responses(
    n: int,
    pieces: Sequence[tuple[Sequence[int], ReweightResponse]],
    failed: Mapping[int, GroupResult],
    info: Mapping[str, Any] | None,
) -> ReweightResponse:
    """One envelope, results in input order, from the sub-requests' answers (a later
    piece for the same position wins: it is a repeat after an eviction)."""
    results: list[GroupResult | None] = [None] * n
    for i, r in failed.items():
        results[i] = r
    tokens, ms = 0, 0.0
    for indices, resp in pieces:
        for k, i in enumerate(indices):
            results[i] = resp.results[k]
        tokens += resp.usage.tokens
        ms += resp.usage.milliseconds
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ProtocolError(f"no result for group(s) {missing[:10]}")
    if pieces:
        first = pieces[0][1]
        model, version, options = first.model, first.version, first.options
    else:
        info = info or {}
        model, version, options = str(info.get("model", "")), str(info.get("version", "")), {}
    return ReweightResponse(
        model=model, version=version, options=options, usage=Usage(tokens=tokens, milliseconds=round(ms, 3)),
        results=results,  # type: ignore[arg-type]
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


def sha_at(ptr: str | None, chunk: Sequence[PreparedGroup]) -> str | None:
    m = GROUP_POINTER.match(ptr or "")
    if m and int(m.group(1)) < len(chunk):
        return chunk[int(m.group(1))].sha256
    return None
