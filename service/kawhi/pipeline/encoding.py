"""How an answer's per-token arrays travel: JSON numbers (default), base64 float32, or not at all.

``encoding_format="base64"`` (as in the OpenAI embeddings API and TEI) sends
``token_advantages`` and ``token_weights`` as base64 strings of little-endian float32:
5.33 bytes per value instead of ~19 for a JSON double, and far cheaper to write and read.
``token_arrays=false`` leaves those two out (the paragraphs carry token spans and weights);
``ref_logprobs`` and ``entropy`` stay, since a request that asks for them means it.
Both are request fields; they change only the encoding of the answer, never its values
beyond float32 rounding, and are part of the idempotency key (a stored answer is stored
in the encoding it was asked in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# per-token arrays of a ResponseResult (ref_logprobs / entropy only when the request asked for them)
ARRAY_FIELDS = ("token_advantages", "token_weights", "ref_logprobs", "entropy")
# what token_arrays=false leaves out: the arrays the paragraphs already determine
OMITTABLE_FIELDS = ("token_advantages", "token_weights")


@dataclass(frozen=True)
class WireFormat:
    encoding_format: str = "float"
    token_arrays: bool = True

    @property
    def is_default(self) -> bool:
        return self.encoding_format == "float" and self.token_arrays


def wire_of(parsed: Any) -> WireFormat:
    """The wire fields of a parsed request (kawhi.pipeline.parse validates them)."""
    return WireFormat(getattr(parsed, "encoding_format", "float"), getattr(parsed, "token_arrays", True))


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
                if not wire.token_arrays and name in OMITTABLE_FIELDS:
                    result.pop(name, None)
                elif wire.encoding_format == "base64" and result.get(name) is not None:
                    result[name] = base64_float32(result[name])
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
