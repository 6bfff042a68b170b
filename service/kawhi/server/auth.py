"""The HTTP side of the optional bearer API keys (the check is kawhi.pipeline.auth)."""

from __future__ import annotations

from starlette.requests import Request

from kawhi.pipeline.auth import bearer_token, key_is_valid, unauthorized


async def require_api_key(request: Request) -> None:
    """FastAPI dependency guarding /v1 routes; a no-op when no keys are configured."""
    keys = request.app.state.kawhi.api_keys
    if not keys:
        return
    if not key_is_valid(bearer_token(request.headers.get("authorization", "")), keys):
        raise unauthorized()
