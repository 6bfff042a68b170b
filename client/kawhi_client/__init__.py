"""kawhi_client: the light SDK of the KAWHI service (httpx + pydantic, no torch)."""

from kawhi_client.schema import (
    GroupResult,
    ImageRef,
    Options,
    Paragraph,
    Problem,
    ResponseIn,
    ResponseResult,
    ReweightRequest,
    ReweightResponse,
    RolloutGroup,
    Usage,
)

__all__ = [
    "GroupResult",
    "ImageRef",
    "Options",
    "Paragraph",
    "Problem",
    "ResponseIn",
    "ResponseResult",
    "ReweightRequest",
    "ReweightResponse",
    "RolloutGroup",
    "Usage",
]
