"""Wire objects of the KAWHI API v1 (see docs/api.md).

These pydantic models are the single definition of the wire format: the server,
the CLI's JSONL files and the Python client all use them. Field names are fixed by
the contract; fields may be added, never renamed. This module needs only pydantic.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from kawhi_client.options import OPTIONS, SGUF_OPTIONS, OptionSpec

EncodingFormat = Literal["float", "base64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _exactly_one_of(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is given (not null)": one ``oneOf``
    branch per field, which requires it non-null and the others absent or null."""
    return {"oneOf": [
        {"required": [name], "properties": {other: ({"type": "null"} if other != name else spec)
                                             for other in fields}}
        for name, spec in fields.items()
    ]}


class ImageRef(_Strict):
    """Exactly one of: base64 bytes, the sha256 of bytes sent earlier, or a path (CLI only)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_of(
        {"data": {"type": "string"}, "sha256": {"type": "string"}, "path": {"type": "string"}}))

    data: str | None = Field(None, description="base64 PNG/JPEG/WebP bytes")
    sha256: str | None = Field(None, description="hex sha256 of bytes the service already holds")
    path: str | None = Field(None, description="local file path; honoured by the CLI only")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageRef:
        given = [k for k in ("data", "sha256", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("image needs exactly one of 'data', 'sha256' or 'path'")
        return self


class ResponseIn(_Strict):
    text: str
    reward: float | None = None
    token_ids: list[int] | None = None


class RolloutGroup(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one_of(
        {"prompt": {"type": "string"}, "messages": {"type": "array"}}))

    id: str | None = None
    image: ImageRef
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    responses: list[ResponseIn] = Field(..., min_length=1)
    advantages: list[float] | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> RolloutGroup:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a group needs exactly one of 'prompt' or 'messages'")
        return self


def _option_field(spec: OptionSpec) -> tuple[Any, Any]:
    """A wire field for one option of kawhi_client.options (None = the server's default)."""
    if spec.kind == "float":
        bound = {"gt" if spec.exclusive_minimum else "ge": spec.minimum, "le": spec.maximum}
        return float | None, Field(None, description=spec.help, allow_inf_nan=False,
                                      **{k: v for k, v in bound.items() if v is not None})
    if spec.kind == "int":
        return int | None, Field(None, description=spec.help, ge=spec.minimum, le=spec.maximum)
    if spec.kind == "heads":
        return Literal["preset", "all"] | list[int] | None, Field(None, description=spec.help)
    if spec.kind == "bool":
        return StrictBool | None, Field(None, description=spec.help)
    if spec.registry:  # any registered name; the service checks it against its registry
        return str | None, Field(None, description=f"{spec.help}; built in: {', '.join(spec.choices)}")
    return Literal[spec.choices] | None, Field(None, description=spec.help)  # type: ignore[valid-type]


SgufOptions = create_model(  # type: ignore[call-overload]
    "SgufOptions", __base__=_Strict, __doc__="SGUF thresholds; None means the server's default.",
    **{o.name: _option_field(o) for o in SGUF_OPTIONS},
)

Options = create_model(  # type: ignore[call-overload]
    "Options", __base__=_Strict,
    __doc__="Per-request options (kawhi_client.options); None means the server's default.",
    sguf=(SgufOptions | None, Field(None, description="SGUF thresholds")),
    **{o.name: _option_field(o) for o in OPTIONS},
)


class ReweightRequest(_Strict):
    groups: list[RolloutGroup] = Field(..., min_length=1)
    options: Options | None = None
    per_group_errors: bool = Field(
        False, description="answer 200 with an error per bad group instead of failing the request"
    )
    encoding_format: EncodingFormat = Field(
        "float", description="per-token arrays as JSON numbers, or base64 of little-endian float32"
    )
    token_arrays: bool = Field(True, description="false: answer without per-token arrays (paragraphs only)")


class Paragraph(BaseModel):
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    alpha: float
    weight: float


class ResponseResult(BaseModel):
    """token_advantages / token_weights: one value per response token; on the wire JSON
    numbers, or base64 strings of little-endian float32 (``encoding_format="base64"``,
    decoded here), or absent (``token_arrays=false``: None)."""

    advantage: float
    paragraphs: list[Paragraph]
    token_advantages: list[float] | None = None
    token_weights: list[float] | None = None
    # present only when the request asked for them (options return_ref_logprobs / return_entropy)
    ref_logprobs: list[float] | None = None
    entropy: list[float] | None = None

    @field_validator("token_advantages", "token_weights", "ref_logprobs", "entropy", mode="wrap")
    @classmethod
    def _decode_base64(cls, value: Any, handler: Any) -> Any:
        if isinstance(value, str):  # decoded floats need no second validation pass
            from kawhi_client.arrays import decode_float32

            return decode_float32(value)
        return handler(value)

    @model_serializer(mode="wrap")
    def _omit_unrequested(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in ("ref_logprobs", "entropy"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Problem(BaseModel):
    """RFC 9457 problem details, with a JSON pointer to the offending field."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    pointer: str | None = None


class GroupResult(BaseModel):
    id: str | None = None
    grid: list[int] = Field(default_factory=list)
    key_tokens: list[int] = Field(default_factory=list)
    selected_tokens: list[int] = Field(default_factory=list)
    responses: list[ResponseResult] = Field(default_factory=list)
    error: Problem | None = None


class ExplainedResult(GroupResult):
    """A GroupResult with ``visual_alignment[r][v]``: the mean cosine of visual token v
    (flat row-major in ``grid``) with response r's tokens over the alignment heads; an
    empty list for an empty response."""

    visual_alignment: list[list[float]] = Field(default_factory=list)


class Usage(BaseModel):
    tokens: int = 0
    milliseconds: float = 0.0


class ReweightResponse(BaseModel):
    model: str
    version: str
    options: dict[str, Any]
    usage: Usage
    results: list[GroupResult]
