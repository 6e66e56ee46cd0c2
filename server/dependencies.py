"""What the routes depend on: FastAPI dependencies, and the annotated types routes declare them with.

``app.py`` builds the :class:`Services` in its lifespan and keeps them, the settings and the metrics
on ``app.state``; routes reach them only through these dependencies (never through ``app.py``), so
the app imports the routers and nothing imports the app.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from atlas.engine import Atlas
from atlas.engine.runtime import Runtime
from atlas.engine.store import StateStore

from .auth import resolve_tenant
from .errors import ApiError
from .metrics import Metrics
from .settings import ServerSettings

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

bearer = HTTPBearer(auto_error=False, description="API key from ATLAS_API_KEYS")


@dataclass
class Services:
    """What the routes work with, built once the model is loaded and the store answers."""

    atlas: Atlas
    store: StateStore
    runtime: Runtime
    model_id: str
    state_bytes: int
    created: int
    owns_store: bool

    def close(self) -> None:
        """Stop the runtime, and close the store if these services opened it."""
        self.runtime.close()
        if self.owns_store:
            self.store.close()


@dataclass
class DemoBaseline:
    """The attention-only model the playground's demo sets beside the served one (routes/demo.py):
    loaded on first use and kept; one run at a time (``lock``), its last answers kept by their key."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    path: FilePath | None = None
    atlas: Atlas | None = None
    last: tuple[tuple[Any, ...], Any] | None = None


def get_services(request: Request) -> Services:
    """The services, or 503 while the model loads (or failed to) and while the server drains."""
    state = request.app.state
    if state.draining:
        raise ApiError("shutting_down", "the server is shutting down", {"Retry-After": "5"})
    services: Services | None = state.services
    if services is None:
        if state.load_error:  # (code, message): checkpoint_invalid, or not_ready for anything else
            raise ApiError(*state.load_error)
        raise ApiError("not_ready", "the model is loading", {"Retry-After": "1"})
    return services


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_demo_baseline(request: Request) -> DemoBaseline:
    return request.app.state.demo_baseline


async def get_tenant(request: Request,
                     _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    """The caller's tenant, or 401 (the ``bearer`` parameter declares the scheme in the OpenAPI)."""
    client = request.client.host if request.client else None
    return resolve_tenant(get_settings(request), request.headers.get("authorization"), client)


def session_id(sid: str = Path(description="Session id.")) -> str:
    """An id the store could hold; anything else cannot exist (404, not a 422)."""
    if not _SESSION_ID.fullmatch(sid):
        raise ApiError("session_not_found", f"no session {sid[:140]}")
    return sid


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters aside (FastAPI's rule)."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json"))


async def json_content(request: Request) -> None:
    """Every route: a JSON body must say so. FastAPI would otherwise read another body as bytes and
    answer a puzzling 422; ``curl -d`` sends ``application/x-www-form-urlencoded`` unless told."""
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is None:  # no JSON body here (ingest streams its own)
        return
    content_type = request.headers.get("content-type")
    if is_json(content_type) or not await request.body():  # an optional body left out is fine
        return
    sent = f"Content-Type: {content_type}" if content_type else "no Content-Type"
    raise ApiError("unsupported_media_type",
                   f"this route takes a JSON body, and the request has {sent}; "
                   "send Content-Type: application/json (curl: -H 'Content-Type: application/json')")


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TenantDep = Annotated[str, Depends(get_tenant)]
SessionIdDep = Annotated[str, Depends(session_id)]
DemoBaselineDep = Annotated[DemoBaseline, Depends(get_demo_baseline)]
