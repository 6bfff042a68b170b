"""Optional bearer API keys (``KAWHI_API_KEYS``), compared in constant time.

A missing, malformed or wrong key gets the same 401 problem with no detail, so the
answer tells a caller nothing about which keys exist or what was wrong.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from kawhi.errors import KawhiError


def _presented_key(request: Request) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return token.strip().encode()


def key_is_valid(presented: bytes, keys: Sequence[bytes]) -> bool:
    """True if presented equals one of keys; every key is compared (no early exit)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented, key)
    return ok and bool(presented)


def unauthorized() -> KawhiError:
    return KawhiError("unauthorized", "", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request) -> None:
    """FastAPI dependency guarding /v1 routes; a no-op when no keys are configured."""
    keys = request.app.state.kawhi.api_keys
    if not keys:
        return
    if not key_is_valid(_presented_key(request), keys):
        raise unauthorized()
