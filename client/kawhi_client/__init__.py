"""kawhi_client: the light SDK of the KAWHI service (httpx + pydantic, no torch).

    from kawhi_client import Client
    with Client("http://kawhi:8000") as kawhi:
        results = kawhi.reweight(groups)           # list[GroupResult], input order

See docs/client.md. Installed with ``pip install kawhi-rl`` (the PyPI name ``kawhi`` is
an unrelated project).
"""

from kawhi_client.arrays import pad_token_advantages, token_advantage_rows
from kawhi_client.client import AsyncClient, Client
from kawhi_client.config import ClientStats, Limits, RetryPolicy, Timeouts, parse_retry_after
from kawhi_client.distribution import warn_if_foreign_kawhi
from kawhi_client.errors import (
    GatewayTimeout,
    ImageNotFound,
    InvalidRequest,
    KawhiConnectionError,
    KawhiError,
    KawhiHTTPError,
    KawhiTimeout,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    ServerError,
    ServerNotReady,
    Unauthorized,
    Unavailable,
)
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

warn_if_foreign_kawhi()  # the unrelated PyPI "kawhi" shares our module name: say so in one line

__all__ = [
    # clients
    "AsyncClient",
    "Client",
    "ClientStats",
    "Limits",
    "RetryPolicy",
    "Timeouts",
    "parse_retry_after",
    # arrays
    "pad_token_advantages",
    "token_advantage_rows",
    # errors
    "GatewayTimeout",
    "ImageNotFound",
    "InvalidRequest",
    "KawhiConnectionError",
    "KawhiError",
    "KawhiHTTPError",
    "KawhiTimeout",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProtocolError",
    "ServerError",
    "ServerNotReady",
    "Unauthorized",
    "Unavailable",
    # wire models
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


def __getattr__(name: str):  # the gRPC clients need the [grpc] extra: imported only when asked for
    if name in ("GrpcClient", "AsyncGrpcClient"):
        try:
            from kawhi_client import grpc
        except ImportError as exc:
            raise ImportError(f"kawhi_client.{name} needs the grpc extra: pip install 'kawhi-rl[grpc]' ({exc})") from None
        return getattr(grpc, name)
    raise AttributeError(f"module 'kawhi_client' has no attribute {name!r}")
