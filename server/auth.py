"""API keys: a Bearer token names a tenant; a tenant sees only its own sessions.

With no keys configured every caller is tenant ``default``; such a server is meant for one user on
one machine, so it refuses non-loopback clients unless ``ATLAS_ALLOW_REMOTE`` says otherwise (in
case it was started behind ``--host 0.0.0.0`` by plain uvicorn, not ``atlas serve``). Routes get the
tenant through ``dependencies.get_tenant``.
"""

from __future__ import annotations

import hmac

from .errors import ApiError
from .settings import ServerSettings, is_loopback

DEFAULT_TENANT = "default"


def _unauthorized(message: str) -> ApiError:
    return ApiError("unauthorized", message, {"WWW-Authenticate": "Bearer"})


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
    presented = token.strip().encode()
    tenant = None
    for key, name in keys.items():  # compare with every key, in constant time each
        if hmac.compare_digest(key.encode(), presented):
            tenant = name
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant

