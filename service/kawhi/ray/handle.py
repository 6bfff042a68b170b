"""What a ``DeploymentHandle`` call carries, in plain Python: no JSON, no base64.

A handle call (``kawhi_client.integrations.ray_backend.RayBackend``) sends the groups of
docs/api.md as dicts whose ``image`` may be the encoded file as ``bytes``; those bytes go
to admission as inline image data (as gRPC's ``bytes`` field does), named by their sha256.
The answer is the ReweightResponse as a dict, or a problem: ``{"response": {...}}`` or
``{"problem": {...RFC 9457 fields...}, "retry_after": "2" | None}``. Only builtins cross
the handle, so the client needs nothing of this package to read them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kawhi_client.schema import ReweightResponse

from kawhi.errors import KawhiError
from kawhi.pipeline.encoding import WireFormat, encode_answer
from kawhi.pipeline.parse import ParsedRequest, check_values, parse_options, parse_prepared_groups


def parse_handle_groups(groups: Any, options: Any, per_group_errors: bool) -> ParsedRequest:
    """Handle arguments as the ParsedRequest the same JSON body would give (same pointers)."""
    if not isinstance(groups, Sequence) or isinstance(groups, (str, bytes)):
        raise KawhiError("validation", "groups must be a list of rollout groups", "/groups")
    if not groups:
        raise KawhiError("validation", "groups must hold at least one rollout group", "/groups")
    if not isinstance(per_group_errors, bool):
        raise KawhiError("validation", "per_group_errors must be true or false", "/per_group_errors")
    if options is not None:
        check_values({"options": options})
    raws: list[Any] = []
    images: dict[int, bytes] = {}
    for i, group in enumerate(groups):
        image = group.get("image") if isinstance(group, Mapping) else None
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            images[i] = data
            group = {**group, "image": {"sha256": hashlib.sha256(data).hexdigest()}}  # the bytes travel beside it
        raws.append(group)
    parsed = parse_prepared_groups(raws, parse_options(options), per_group_errors=per_group_errors,
                                   check=_checked)
    parsed.images = images
    return parsed


def _checked(group: Any) -> Any:
    check_values(group, depth=2)
    return group


class PythonCodec:
    """The answer as a dict of builtins (the floats the JSON answer would carry, bit for bit)."""

    name = "python"

    def encode(self, response: ReweightResponse, wire: WireFormat) -> tuple[dict[str, Any], bytes]:
        return response.model_dump(), encode_answer(response, wire)

    def decode(self, data: bytes) -> dict[str, Any]:
        return json.loads(data)


PYTHON = PythonCodec()


def problem_of(err: KawhiError) -> dict[str, Any]:
    return {"problem": err.to_problem(), "retry_after": err.headers.get("Retry-After")}
