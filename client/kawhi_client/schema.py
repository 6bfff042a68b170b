"""Wire objects of the KAWHI API v1 (see docs/api.md).

These pydantic models are the single definition of the wire format: the server,
the CLI's JSONL files and the Python client all use them. Field names are fixed by
the contract; fields may be added, never renamed. This module needs only pydantic.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Estimator = Literal["grpo", "drgrpo", "rloo", "given"]
StdKind = Literal["population", "unbiased"]
Normalize = Literal["none", "mean"]
RegionStrategy = Literal["sguf", "all", "random", "inverse"]
Similarity = Literal["query_key", "key_key"]
Granularity = Literal["paragraph", "sentence", "token"]
RopeMode = Literal["after", "before"]
EncodingFormat = Literal["float", "base64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageRef(_Strict):
    """Exactly one of: base64 bytes, the sha256 of bytes sent earlier, or a path (CLI only)."""

    data: Optional[str] = Field(None, description="base64 PNG/JPEG/WebP bytes")
    sha256: Optional[str] = Field(None, description="hex sha256 of bytes the service already holds")
    path: Optional[str] = Field(None, description="local file path; honoured by the CLI only")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageRef":
        given = [k for k in ("data", "sha256", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("image needs exactly one of 'data', 'sha256' or 'path'")
        return self


class ResponseIn(_Strict):
    text: str
    reward: Optional[float] = None
    token_ids: Optional[list[int]] = None


class RolloutGroup(_Strict):
    id: Optional[str] = None
    image: ImageRef
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    responses: list[ResponseIn] = Field(..., min_length=1)
    advantages: Optional[list[float]] = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "RolloutGroup":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a group needs exactly one of 'prompt' or 'messages'")
        return self


class Options(_Strict):
    """Per-request options; None means the server's default (see kawhi.engine.config)."""

    estimator: Optional[Estimator] = None
    std: Optional[StdKind] = None
    eps: Optional[float] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, gt=0)
    smoothing: Optional[float] = Field(None, ge=0, le=1)
    w_min: Optional[float] = None
    w_max: Optional[float] = None
    normalize: Optional[Normalize] = None
    heads: Optional[Union[Literal["preset", "all"], list[int]]] = None
    seed: Optional[int] = None
    regions: Optional[RegionStrategy] = None
    similarity: Optional[Similarity] = None
    granularity: Optional[Granularity] = None
    rope: Optional[RopeMode] = None
    skip_ratio: Optional[float] = Field(None, ge=0, le=1)


class ReweightRequest(_Strict):
    groups: list[RolloutGroup] = Field(..., min_length=1)
    options: Optional[Options] = None
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
    token_advantages: Optional[list[float]] = None
    token_weights: Optional[list[float]] = None

    @field_validator("token_advantages", "token_weights", mode="wrap")
    @classmethod
    def _decode_base64(cls, value: Any, handler: Any) -> Any:
        if isinstance(value, str):  # decoded floats need no second validation pass
            from kawhi_client.arrays import decode_float32

            return decode_float32(value)
        return handler(value)


class Problem(BaseModel):
    """RFC 9457 problem details, with a JSON pointer to the offending field."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    pointer: Optional[str] = None


class GroupResult(BaseModel):
    id: Optional[str] = None
    grid: list[int] = Field(default_factory=list)
    key_tokens: list[int] = Field(default_factory=list)
    selected_tokens: list[int] = Field(default_factory=list)
    responses: list[ResponseResult] = Field(default_factory=list)
    error: Optional[Problem] = None


class Usage(BaseModel):
    tokens: int = 0
    milliseconds: float = 0.0


class ReweightResponse(BaseModel):
    model: str
    version: str
    options: dict[str, Any]
    usage: Usage
    results: list[GroupResult]
