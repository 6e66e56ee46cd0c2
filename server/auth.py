"""API keys: a Bearer token names a tenant; a tenant sees only its own sessions.

With no keys configured every caller is tenant ``default``; such a server is meant for one user on
one machine, so it refuses non-loopback clients unless ``ATLAS_ALLOW_REMOTE`` says otherwise (in
case it was started behind ``--host 0.0.0.0`` by plain uvicorn, not ``atlas serve``).
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .settings import ServerSettings, is_loopback

DEFAULT_TENANT = "default"

bearer = HTTPBearer(auto_error=False, description="API key from ATLAS_API_KEYS")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def resolve_tenant(settings: ServerSettings, authorization: str | None, client_host: str | None) -> str:
    """The tenant of a request, or ApiError 401."""
    keys = settings.tenants_by_key
    if not keys:
        if not settings.allow_remote and not is_loopback(client_host):
            raise _unauthorized("no API keys are configured, so only loopback clients are served "
                                "(set ATLAS_API_KEYS, or ATLAS_ALLOW_REMOTE=1)")
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    token = token.strip().encode()
    tenant = None
    for key, name in keys.items():  # compare with every key, in constant time each
        if hmac.compare_digest(key.encode(), token):
            tenant = name
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant


async def tenant(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """FastAPI dependency: the caller's tenant (declares the Bearer scheme in the OpenAPI too)."""
    settings: ServerSettings = request.app.state.settings
    client = request.client.host if request.client else None
    return resolve_tenant(settings, request.headers.get("authorization"), client)
