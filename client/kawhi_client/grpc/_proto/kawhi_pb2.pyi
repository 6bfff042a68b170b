from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageRef(_message.Message):
    __slots__ = ("data", "sha256", "path")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    path: str
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ResponseIn(_message.Message):
    __slots__ = ("text", "reward", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    reward: float
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., reward: _Optional[float] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RolloutGroup(_message.Message):
    __slots__ = ("id", "image", "prompt", "messages", "responses", "advantages")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: ImageRef
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    responses: _containers.RepeatedCompositeFieldContainer[ResponseIn]
    advantages: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[ImageRef, _Mapping]] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., responses: _Optional[_Iterable[_Union[ResponseIn, _Mapping]]] = ..., advantages: _Optional[_Iterable[float]] = ...) -> None: ...

class Options(_message.Message):
    __slots__ = ("estimator", "std", "eps", "temperature", "smoothing", "w_min", "w_max", "normalize", "heads", "seed", "regions", "similarity", "granularity", "rope", "skip_ratio", "sguf", "return_ref_logprobs", "return_entropy", "logprob_temperature")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    W_MIN_FIELD_NUMBER: _ClassVar[int]
    W_MAX_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    ROPE_FIELD_NUMBER: _ClassVar[int]
    SKIP_RATIO_FIELD_NUMBER: _ClassVar[int]
    SGUF_FIELD_NUMBER: _ClassVar[int]
    RETURN_REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    estimator: str
    std: str
    eps: float
    temperature: float
    smoothing: float
    w_min: float
    w_max: float
    normalize: str
    heads: _struct_pb2.Value
    seed: int
    regions: str
    similarity: str
    granularity: str
    rope: str
    skip_ratio: float
    sguf: SgufOptions
    return_ref_logprobs: bool
    return_entropy: bool
    logprob_temperature: float
    def __init__(self, estimator: _Optional[str] = ..., std: _Optional[str] = ..., eps: _Optional[float] = ..., temperature: _Optional[float] = ..., smoothing: _Optional[float] = ..., w_min: _Optional[float] = ..., w_max: _Optional[float] = ..., normalize: _Optional[str] = ..., heads: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., seed: _Optional[int] = ..., regions: _Optional[str] = ..., similarity: _Optional[str] = ..., granularity: _Optional[str] = ..., rope: _Optional[str] = ..., skip_ratio: _Optional[float] = ..., sguf: _Optional[_Union[SgufOptions, _Mapping]] = ..., return_ref_logprobs: _Optional[bool] = ..., return_entropy: _Optional[bool] = ..., logprob_temperature: _Optional[float] = ...) -> None: ...

class SgufOptions(_message.Message):
    __slots__ = ("delta_s", "delta_l", "beta", "sigma", "eps")
    DELTA_S_FIELD_NUMBER: _ClassVar[int]
    DELTA_L_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    delta_s: float
    delta_l: float
    beta: float
    sigma: float
    eps: float
    def __init__(self, delta_s: _Optional[float] = ..., delta_l: _Optional[float] = ..., beta: _Optional[float] = ..., sigma: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class ReweightRequest(_message.Message):
    __slots__ = ("groups", "options", "per_group_errors", "encoding_format", "token_arrays")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PER_GROUP_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FORMAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ARRAYS_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[RolloutGroup]
    options: Options
    per_group_errors: bool
    encoding_format: str
    token_arrays: bool
    def __init__(self, groups: _Optional[_Iterable[_Union[RolloutGroup, _Mapping]]] = ..., options: _Optional[_Union[Options, _Mapping]] = ..., per_group_errors: _Optional[bool] = ..., encoding_format: _Optional[str] = ..., token_arrays: _Optional[bool] = ...) -> None: ...

class Paragraph(_message.Message):
    __slots__ = ("char_start", "char_end", "token_start", "token_end", "alpha", "weight")
    CHAR_START_FIELD_NUMBER: _ClassVar[int]
    CHAR_END_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    alpha: float
    weight: float
    def __init__(self, char_start: _Optional[int] = ..., char_end: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., alpha: _Optional[float] = ..., weight: _Optional[float] = ...) -> None: ...

class ResponseResult(_message.Message):
    __slots__ = ("advantage", "paragraphs", "token_advantages", "token_weights", "ref_logprobs", "entropy")
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    PARAGRAPHS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    advantage: float
    paragraphs: _containers.RepeatedCompositeFieldContainer[Paragraph]
    token_advantages: _containers.RepeatedScalarFieldContainer[float]
    token_weights: _containers.RepeatedScalarFieldContainer[float]
    ref_logprobs: _containers.RepeatedScalarFieldContainer[float]
    entropy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, advantage: _Optional[float] = ..., paragraphs: _Optional[_Iterable[_Union[Paragraph, _Mapping]]] = ..., token_advantages: _Optional[_Iterable[float]] = ..., token_weights: _Optional[_Iterable[float]] = ..., ref_logprobs: _Optional[_Iterable[float]] = ..., entropy: _Optional[_Iterable[float]] = ...) -> None: ...

class FieldError(_message.Message):
    __slots__ = ("pointer", "detail")
    POINTER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    pointer: str
    detail: str
    def __init__(self, pointer: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class Problem(_message.Message):
    __slots__ = ("type", "title", "status", "detail", "pointer", "errors", "sha256", "request_id", "extensions")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    type: str
    title: str
    status: int
    detail: str
    pointer: str
    errors: _containers.RepeatedCompositeFieldContainer[FieldError]
    sha256: str
    request_id: str
    extensions: _struct_pb2.Struct
    def __init__(self, type: _Optional[str] = ..., title: _Optional[str] = ..., status: _Optional[int] = ..., detail: _Optional[str] = ..., pointer: _Optional[str] = ..., errors: _Optional[_Iterable[_Union[FieldError, _Mapping]]] = ..., sha256: _Optional[str] = ..., request_id: _Optional[str] = ..., extensions: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GroupResult(_message.Message):
    __slots__ = ("id", "grid", "key_tokens", "selected_tokens", "responses", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    KEY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    grid: _containers.RepeatedScalarFieldContainer[int]
    key_tokens: _containers.RepeatedScalarFieldContainer[int]
    selected_tokens: _containers.RepeatedScalarFieldContainer[int]
    responses: _containers.RepeatedCompositeFieldContainer[ResponseResult]
    error: Problem
    def __init__(self, id: _Optional[str] = ..., grid: _Optional[_Iterable[int]] = ..., key_tokens: _Optional[_Iterable[int]] = ..., selected_tokens: _Optional[_Iterable[int]] = ..., responses: _Optional[_Iterable[_Union[ResponseResult, _Mapping]]] = ..., error: _Optional[_Union[Problem, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tokens", "milliseconds")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    milliseconds: float
    def __init__(self, tokens: _Optional[int] = ..., milliseconds: _Optional[float] = ...) -> None: ...

class ReweightResponse(_message.Message):
    __slots__ = ("model", "version", "options", "usage", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    options: _struct_pb2.Struct
    usage: Usage
    results: _containers.RepeatedCompositeFieldContainer[GroupResult]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., results: _Optional[_Iterable[_Union[GroupResult, _Mapping]]] = ...) -> None: ...

class ReweightStreamResult(_message.Message):
    __slots__ = ("result", "request_index", "group_index", "model", "version", "usage")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    result: GroupResult
    request_index: int
    group_index: int
    model: str
    version: str
    usage: Usage
    def __init__(self, result: _Optional[_Union[GroupResult, _Mapping]] = ..., request_index: _Optional[int] = ..., group_index: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("sha256", "bytes", "width", "height")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    bytes: int
    width: int
    height: int
    def __init__(self, sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
