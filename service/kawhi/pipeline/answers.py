"""What the serving core answers (kawhi.pipeline.service): an answer in a front end's encoding
(a ``Codec``: JSON bytes for HTTP, a serialised message for gRPC), a stored image's
description, and ``Info`` (``GET /v1/info``, gRPC ``Info``), typed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

from kawhi_client.schema import ReweightResponse

from kawhi import __version__
from kawhi.pipeline.core import Admission, Pipeline
from kawhi.pipeline.encoding import WireFormat, encode_answer, wire_of


class Codec(Protocol):
    """How a front end wants an answer: ``encode`` gives (payload, bytes to store), ``decode``
    turns stored bytes back into a payload. ``name`` is part of the idempotency key."""

    name: str

    def encode(self, response: ReweightResponse, wire: WireFormat) -> tuple[Any, bytes]: ...

    def decode(self, data: bytes) -> Any: ...


class JsonCodec:
    """The JSON bytes of docs/api.md, in the encoding the request asked for (HTTP)."""

    name = "json"

    def encode(self, response: ReweightResponse, wire: WireFormat) -> tuple[bytes, bytes]:
        data = encode_answer(response, wire)
        return data, data

    def decode(self, data: bytes) -> bytes:
        return data


JSON = JsonCodec()


@dataclass
class Answer:
    """One reweight answer: the codec's ``payload``; where it came from (``"hit"``: stored,
    ``"joined"``: the same request's attempt in flight, ``"miss"``: computed); ``response``:
    the model when this request computed it."""

    payload: Any
    source: str
    response: ReweightResponse | None = None


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    bytes: int
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes, "width": self.width, "height": self.height}


@dataclass(frozen=True)
class ServerInfo:
    batch_tokens: int
    batch_wait_ms: float
    queue_groups: int
    request_timeout_s: float
    redis: bool
    redis_degraded: bool
    auth: bool


@dataclass(frozen=True)
class Info:
    """``GET /v1/info`` / ``Info``: the engine's description, the limits a request must keep,
    the server's scheduling. ``to_dict`` is the wire object (docs/api.md)."""

    engine: dict[str, Any]
    limits: dict[str, Any]
    server: ServerInfo
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.engine)
        out["version"] = self.version
        out["limits"] = dict(self.limits)
        out["server"] = dict(vars(self.server))
        return out


def idempotency_key(pipeline: Pipeline, admission: Admission, codec: str) -> str:
    groups = []
    for a in admission.groups:
        g = a.group.model_dump(mode="python")
        g["image"] = {"sha256": a.sha256}
        groups.append(g)
    canonical = {
        "v": 2, "version": __version__, "model": pipeline.engine.model_name,
        "tokenizer": pipeline.engine.tokenizer_fingerprint, "options": admission.config.to_dict(),
        "per_group_errors": admission.parsed.per_group_errors, "groups": groups,
    }
    wire = wire_of(admission.parsed)
    if not wire.is_default:  # a stored answer is stored in the encoding it was asked in
        canonical["wire"] = [wire.encoding_format, wire.token_arrays]
    if codec != JSON.name:
        canonical["codec"] = codec
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
