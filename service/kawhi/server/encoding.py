"""How an answer's per-token arrays travel: JSON numbers (default), base64 float32, or not at all.

``encoding_format="base64"`` (as in the OpenAI embeddings API and TEI) sends
``token_advantages`` and ``token_weights`` as base64 strings of little-endian float32:
5.33 bytes per value instead of ~19 for a JSON double, and far cheaper to write and read.
``token_arrays=false`` leaves them out (the paragraphs carry token spans and weights).
Both are request fields; they change only the encoding of the answer, never its values
beyond float32 rounding, and are part of the idempotency key (a stored answer is stored
in the encoding it was asked in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kawhi.server.problems import ProblemError

ARRAY_FIELDS = ("token_advantages", "token_weights")


@dataclass(frozen=True)
class WireFormat:
    encoding_format: str = "float"
    token_arrays: bool = True

    @property
    def is_default(self) -> bool:
        return self.encoding_format == "float" and self.token_arrays


def wire_format(obj: Any) -> WireFormat:
    """The wire fields of a parsed request body (validated; 422 with a pointer otherwise)."""
    if not isinstance(obj, dict):
        return WireFormat()
    encoding = obj.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ProblemError(422, "validation", f"encoding_format must be 'float' or 'base64', not {encoding!r}"[:200],
                           "/encoding_format")
    arrays = obj.get("token_arrays", True)
    if not isinstance(arrays, bool):
        raise ProblemError(422, "validation", "token_arrays must be true or false", "/token_arrays")
    return WireFormat(encoding, arrays)


def base64_float32(values: Any) -> str:
    import base64

    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def encode_answer(response: Any, wire: WireFormat) -> bytes:
    """A ReweightResponse as the JSON bytes the request asked for."""
    if wire.is_default:
        return response.model_dump_json().encode()
    import json

    data = response.model_dump(mode="json")
    for group in data["results"]:
        for result in group.get("responses") or ():
            for name in ARRAY_FIELDS:
                if not wire.token_arrays:
                    result.pop(name, None)
                elif result.get(name) is not None:
                    result[name] = base64_float32(result[name])
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
