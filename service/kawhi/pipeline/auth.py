"""Optional bearer API keys (``KAWHI_API_KEYS``), compared in constant time, for every front end.

A missing, malformed or wrong key gets the same ``unauthorized`` problem with no detail,
so the answer tells a caller nothing about which keys exist or what was wrong.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from kawhi.errors import KawhiError


def bearer_token(authorization: str) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` value (b"" for any other scheme)."""
    scheme, _, token = authorization.partition(" ")
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
