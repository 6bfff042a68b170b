"""Wire objects (the dicts and pydantic models of kawhi_client.schema) <-> kawhi.v1 messages.

One conversion, used by both ends: the gRPC server turns a request message into the
same wire dict an HTTP body parses to (image bytes as base64, absent fields absent),
so the one request pipeline validates it and names errors with the same pointers;
the client turns its wire groups into messages and the answer back into the same
``ReweightResponse`` the HTTP client returns.

Written by hand rather than with ``json_format`` because the per-token arrays are
the bulk of a batch: they go straight between Python lists and packed fields.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.schema import GroupResult, Problem, ReweightResponse

# Options fields with explicit presence, in the proto's order (``heads`` is a Value).
OPTION_FIELDS = (
    "estimator", "std", "eps", "temperature", "smoothing", "w_min", "w_max", "normalize", "seed",
    "regions", "similarity", "granularity", "rope", "skip_ratio",
    "return_ref_logprobs", "return_entropy", "logprob_temperature",
)
# per-response arrays: absent (None) on the wire models when not sent
_ARRAYS = ("token_advantages", "token_weights", "ref_logprobs", "entropy")
SGUF_FIELDS = ("delta_s", "delta_l", "beta", "sigma", "eps")


# ============================================================================ structs


def to_struct(obj: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object (tuples allowed, as engine option dicts hold) as a Struct."""
    s = struct_pb2.Struct()
    json_format.ParseDict(_jsonable(obj), s)
    return s


def from_struct(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a JSON object; numbers that are whole come back as ints (JSON has no
    int/float split, Struct keeps doubles) so that e.g. ``seed`` reads as over HTTP."""
    return _ints(json_format.MessageToDict(s))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # Struct has no NaN; a resolved option never is one
    return obj


def _ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _ints(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_ints(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    return obj


# ============================================================================ requests


def group_to_message(g: Mapping[str, Any]) -> pb.RolloutGroup:
    """A wire group (dict) -> RolloutGroup. ``image.data`` may be base64 text or bytes.

    Raises ValueError/TypeError for a value the message cannot hold (a token id past
    int32, a prompt that is not text); the caller names the group.
    """
    m = pb.RolloutGroup()
    if g.get("id") is not None:
        m.id = g["id"]
    img = g.get("image")
    if isinstance(img, Mapping):
        if img.get("data") is not None:
            data = img["data"]
            m.image.data = base64.b64decode(data) if isinstance(data, str) else bytes(data)
        elif img.get("sha256") is not None:
            m.image.sha256 = img["sha256"]
        elif img.get("path") is not None:
            m.image.path = str(img["path"])
    if g.get("prompt") is not None:
        m.prompt = g["prompt"]
    for message in g.get("messages") or ():
        m.messages.append(to_struct(message))
    for r in g.get("responses") or ():
        out = m.responses.add(text=r.get("text", ""))
        if r.get("reward") is not None:
            out.reward = r["reward"]
        if r.get("token_ids") is not None:
            out.token_ids.extend(r["token_ids"])
    if g.get("advantages") is not None:
        m.advantages.extend(g["advantages"])
    return m


def options_to_message(options: Mapping[str, Any] | None) -> pb.Options | None:
    if not options:
        return None
    m = pb.Options()
    for name, value in options.items():
        if value is None:
            continue
        if name == "heads":
            json_format.ParseDict(list(value) if isinstance(value, (list, tuple)) else value, m.heads)
        elif name == "sguf":
            m.sguf.SetInParent()
            for key, v in dict(value).items():
                if v is not None:
                    setattr(m.sguf, key, v)
        else:
            setattr(m, name, value)
    return m


def request_to_message(
    groups: list[Mapping[str, Any]], options: Mapping[str, Any] | None = None, per_group_errors: bool = False,
    *, token_arrays: bool | None = None,
) -> pb.ReweightRequest:
    req = pb.ReweightRequest(groups=[group_to_message(g) for g in groups], per_group_errors=per_group_errors)
    if token_arrays is not None:
        req.token_arrays = token_arrays
    opts = options_to_message(options)
    if opts is not None:
        req.options.CopyFrom(opts)
    return req


def group_parts(m: pb.RolloutGroup, inline_image: Callable[[bytes], dict[str, Any]],
                ) -> tuple[dict[str, Any], bytes | None, list[list[int] | None]]:
    """A group message -> (the wire dict of its fields, its inline image bytes, each
    response's token ids or None). The one reading of a group message: the server checks
    the dict and keeps the bytes and token ids as they are (``kawhi.grpc.messages``);
    ``group_from_message`` puts them back into the HTTP body's shape. ``inline_image``:
    what ``image`` holds when the bytes came inline."""
    g: dict[str, Any] = {}
    data: bytes | None = None
    if m.HasField("id"):
        g["id"] = m.id
    if m.HasField("image"):
        which = m.image.WhichOneof("source")
        if which == "data":
            data = m.image.data
            g["image"] = inline_image(data)
        elif which is not None:
            g["image"] = {which: getattr(m.image, which)}
        else:
            g["image"] = {}
    if m.HasField("prompt"):
        g["prompt"] = m.prompt
    if len(m.messages):
        g["messages"] = [json_format.MessageToDict(s) for s in m.messages]
    responses, token_ids = [], []
    for r in m.responses:
        out: dict[str, Any] = {"text": r.text}
        if r.HasField("reward"):
            out["reward"] = r.reward
        responses.append(out)
        token_ids.append(r.token_ids[:] if len(r.token_ids) else None)  # a list (slicing is the fast copy)
    g["responses"] = responses
    if len(m.advantages):
        g["advantages"] = m.advantages[:]
    return g, data, token_ids


def group_from_message(m: pb.RolloutGroup) -> dict[str, Any]:
    """RolloutGroup -> the wire dict an HTTP body holds for it (image bytes as base64)."""
    g, _, token_ids = group_parts(m, lambda data: {"data": base64.b64encode(data).decode("ascii")})
    for out, ids in zip(g["responses"], token_ids):
        if ids is not None:
            out["token_ids"] = ids
    return g


def options_from_message(m: pb.Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in OPTION_FIELDS:
        if m.HasField(name):
            out[name] = getattr(m, name)
    if m.HasField("heads"):
        out["heads"] = _ints(json_format.MessageToDict(m.heads))
    if m.HasField("sguf"):
        out["sguf"] = {name: getattr(m.sguf, name) for name in SGUF_FIELDS if m.sguf.HasField(name)}
    return out


def request_from_message(m: pb.ReweightRequest) -> dict[str, Any]:
    """ReweightRequest -> the HTTP body object of ``POST /v1/reweight`` it stands for."""
    body: dict[str, Any] = {"groups": [group_from_message(g) for g in m.groups]}
    if m.HasField("options"):
        body["options"] = options_from_message(m.options)
    if m.per_group_errors:
        body["per_group_errors"] = True
    for name in ("encoding_format", "token_arrays"):
        if m.HasField(name):
            body[name] = getattr(m, name)
    return body


# ============================================================================ answers


def problem_to_message(p: Problem) -> pb.Problem:
    m = pb.Problem(type=p.type, title=p.title, status=p.status, detail=p.detail or "")
    if p.pointer is not None:
        m.pointer = p.pointer
    extra = dict(p.model_extra or {})
    for e in extra.pop("errors", None) or ():
        if isinstance(e, Mapping):
            m.errors.add(pointer=str(e.get("pointer") or ""), detail=str(e.get("detail") or ""))
    for name in ("sha256", "request_id"):
        if extra.get(name) is not None:
            setattr(m, name, str(extra.pop(name)))
    extra = {k: v for k, v in extra.items() if v is not None}
    if extra:
        m.extensions.CopyFrom(to_struct(extra))
    return m


def problem_from_message(m: pb.Problem) -> Problem:
    data: dict[str, Any] = {"type": m.type, "title": m.title, "status": m.status, "detail": m.detail}
    data["pointer"] = m.pointer if m.HasField("pointer") else None
    if len(m.errors):
        data["errors"] = [{"pointer": e.pointer, "detail": e.detail} for e in m.errors]
    for name in ("sha256", "request_id"):
        if m.HasField(name):
            data[name] = getattr(m, name)
    if m.HasField("extensions"):
        data.update(from_struct(m.extensions))
    return Problem.model_validate(data)


def group_result_to_message(r: GroupResult, *, token_arrays: bool = True) -> pb.GroupResult:
    """token_arrays=False: without the per-token advantages and weights (the paragraphs hold them)."""
    arrays = _ARRAYS if token_arrays else _ARRAYS[2:]
    m = pb.GroupResult(grid=r.grid, key_tokens=r.key_tokens, selected_tokens=r.selected_tokens)
    for x in r.responses:
        out = m.responses.add(advantage=x.advantage)
        for p in x.paragraphs:
            out.paragraphs.add(char_start=p.char_start, char_end=p.char_end, token_start=p.token_start,
                               token_end=p.token_end, alpha=p.alpha, weight=p.weight)
        for name in arrays:  # extend: cheaper than the constructor's keyword for packed doubles
            values = getattr(x, name)
            if values:
                getattr(out, name).extend(values)
    if r.id is not None:
        m.id = r.id
    if r.error is not None:
        m.error.CopyFrom(problem_to_message(r.error))
    return m


def _group_result_skeleton(m: pb.GroupResult) -> dict[str, Any]:
    """A GroupResult message as a wire dict without the per-token arrays (see :func:`_with_arrays`)."""
    return {
        "id": m.id if m.HasField("id") else None,
        "grid": m.grid[:],
        "key_tokens": m.key_tokens[:],
        "selected_tokens": m.selected_tokens[:],
        "responses": [
            {
                "advantage": x.advantage,
                "paragraphs": [
                    {"char_start": p.char_start, "char_end": p.char_end, "token_start": p.token_start,
                     "token_end": p.token_end, "alpha": p.alpha, "weight": p.weight}
                    for p in x.paragraphs
                ],
            }
            for x in m.responses
        ],
        "error": problem_from_message(m.error) if m.HasField("error") else None,
    }


def _with_arrays(result: GroupResult, m: pb.GroupResult) -> GroupResult:
    """``result`` (validated without its arrays) with the per-token arrays of ``m`` set as they
    are: packed doubles are floats already, so validating them would only copy the bulk of the
    answer again."""
    for response, x in zip(result.responses, m.responses):
        for name in _ARRAYS:
            setattr(response, name, _array(x, name))
    return result


def _array(x: pb.ResponseResult, name: str) -> list[float] | None:
    """A per-token array of a response, or None where it was not sent: an empty array of a
    response that has paragraphs (so at least one token) stands for an absent one; an empty
    response keeps its empty token arrays and has no log-probs."""
    values = getattr(x, name)
    if len(values) or (not len(x.paragraphs) and name in ("token_advantages", "token_weights")):
        return values[:]  # a list; slicing is faster than list() on protobuf's repeated fields
    return None


def group_result_from_message(m: pb.GroupResult) -> GroupResult:
    return _with_arrays(GroupResult.model_validate(_group_result_skeleton(m)), m)


def response_to_message(r: ReweightResponse, *, token_arrays: bool = True) -> pb.ReweightResponse:
    """The answer message, straight from the model (token_arrays as group_result_to_message)."""
    return pb.ReweightResponse(
        model=r.model,
        version=r.version,
        options=to_struct(r.options),
        usage=pb.Usage(tokens=r.usage.tokens, milliseconds=r.usage.milliseconds),
        results=[group_result_to_message(x, token_arrays=token_arrays) for x in r.results],
    )


def response_json_to_message(data: bytes) -> pb.ReweightResponse:
    """The server's own JSON answer (what the idempotent result cache holds) -> ReweightResponse
    message (pydantic's JSON parser is several times faster than ``json.loads`` on the
    per-token arrays)."""
    return response_to_message(ReweightResponse.model_validate_json(data))


def response_from_message(m: pb.ReweightResponse) -> ReweightResponse:
    """The answer message as the model the HTTP client returns (arrays as :func:`_with_arrays`)."""
    response = ReweightResponse.model_validate({
        "model": m.model,
        "version": m.version,
        "options": from_struct(m.options),
        "usage": {"tokens": m.usage.tokens, "milliseconds": m.usage.milliseconds},
        "results": [_group_result_skeleton(x) for x in m.results],
    })
    for result, x in zip(response.results, m.results):
        _with_arrays(result, x)
    return response


def json_dumps(obj: Any) -> str:
    """Compact JSON for ErrorInfo metadata values."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str)
