"""The FastAPI app: ``create_app(settings, atlas=None, store=None)``.

The app is thin: routes validate and authorise, then call the engine runtime. The lifespan builds
the ``Services`` the routes depend on (model, store, runtime; ``dependencies.py``) and, on shutdown,
drains: new requests get 503, in-flight ones get up to ``ATLAS_DRAIN_TIMEOUT_S`` to finish, then the
runtime and the store are closed. The runtime saves each session at the end of every operation (and
every ``ATLAS_CHECKPOINT_TOKENS`` of an ingest), so there is nothing dirty to flush at shutdown
beyond waiting for those saves.

Run it with ``atlas serve`` or ``python -m uvicorn atlas.server.app:create_app --factory``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atlas.engine import Atlas
from atlas.engine.checkpoint import CheckpointError
from atlas.engine.runtime import Runtime, RuntimeSettings
from atlas.engine.store import StateStore, StoreSettings, open_store

from .dependencies import Services, json_content
from .errors import ApiError, install_handlers
from .metrics import Metrics
from .routes import completions, ops, playground, sessions
from .settings import ServerSettings

log = logging.getLogger("atlas.server")

#: Paths served while loading and while draining (probes and scrapes).
OPS_PATHS = {"/health", "/ready", "/metrics"}


def default_model_id(settings: ServerSettings) -> str:
    if settings.model_id:
        return settings.model_id
    return Path(settings.model).resolve().name if settings.model else "atlas-demo"


def build_services(settings: ServerSettings, atlas: Atlas | None, store: StateStore | None,
                   runtime_settings: RuntimeSettings | None) -> Services:
    """Load the model, open the store, start the runtime (blocking; run in a thread)."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if atlas is None:
        atlas = Atlas.load(settings.model, device=settings.device, dtype=getattr(torch, settings.dtype))
    owns_store = store is None
    store_settings = StoreSettings()
    if store is None:
        store = open_store(store_settings)
    try:
        if not store.ping():
            raise RuntimeError("the session store does not answer")
        runtime = Runtime(atlas, store, runtime_settings or RuntimeSettings(),
                          cache_bytes=store_settings.cache_bytes)
    except BaseException:
        if owns_store:
            store.close()
        raise
    return Services(atlas, store, runtime, default_model_id(settings), atlas.state_bytes, int(time.time()),
                    owns_store)


async def drain(app: FastAPI, timeout_s: float) -> None:
    """Wait for in-flight requests and runtime work to finish, up to ``timeout_s``."""
    services: Services | None = app.state.services
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = app.state.inflight + (services.runtime.stats.admitted if services else 0)
        if busy == 0:
            return
        await asyncio.sleep(0.05)
    log.warning("drain timeout: %d requests still running; cancelling them", app.state.inflight)


def create_app(settings: ServerSettings | None = None, atlas: Atlas | None = None,
               store: StateStore | None = None, runtime_settings: RuntimeSettings | None = None) -> FastAPI:
    """The app. With ``atlas`` and ``store`` given (tests) it is ready as soon as it starts; else
    the model loads and the store opens in the background, and /ready says 503 until then. A store
    given here is the caller's to close; one the app opened, it closes."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def start() -> None:
            try:
                services = await asyncio.to_thread(build_services, settings, atlas, store, runtime_settings)
                app.state.services = services
                a = services.atlas
                log.info("ready: model %s (%s) on %s, %s parameters in %s (%s weight bytes), "
                         "state %s bytes per session", services.model_id, a.fingerprint[:12], a.device,
                         f"{a.parameters:,}", a.dtype_name, f"{a.weight_bytes:,}",
                         f"{services.state_bytes:,}")
            except CheckpointError as e:  # its message names the file and the fix: no traceback
                log.error("could not load the model: %s", e)
                app.state.load_error = f"{type(e).__name__}: {e}"
            except Exception as e:
                log.exception("could not start the engine")
                app.state.load_error = f"{type(e).__name__}: {e}"

        if not settings.auth_enabled:
            log.warning("no API keys configured (ATLAS_API_KEYS): every request is tenant 'default'%s",
                        "" if settings.allow_remote else "; only loopback clients are served")
        loader = asyncio.create_task(start())
        if atlas is not None and store is not None:
            await loader
        try:
            yield
        finally:
            app.state.draining = True
            await asyncio.shield(loader)  # a model still loading: let it finish so its store closes
            await drain(app, settings.drain_timeout_s)
            services: Services | None = app.state.services
            if services is not None:
                await asyncio.to_thread(services.close)
            app.state.services = None
            log.info("stopped")

    app = FastAPI(title="ATLAS inference server", version="0.1.0", lifespan=lifespan,
                  description="Streaming long-context inference for recurrent ATLAS models. "
                              "Errors: {\"error\": {\"code\", \"message\"}}.",
                  openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(json_content)])
    app.state.settings = settings
    app.state.services = None
    app.state.load_error = None
    app.state.draining = False
    app.state.inflight = 0
    app.state.create_locks = {}
    app.state.metrics = Metrics(lambda: app.state.services)
    install_handlers(app)
    app.include_router(ops.router)
    app.include_router(sessions.router)
    app.include_router(completions.router)
    app.include_router(playground.router)
    app.add_middleware(RequestGate)
    return app


class RequestGate:
    """Pure ASGI middleware (it must not buffer streams): counts in-flight requests for the drain,
    refuses new work while draining, caps JSON bodies and counts responses for /metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fapp = scope["app"]
        settings: ServerSettings = fapp.state.settings
        path: str = scope["path"]
        if fapp.state.draining and path not in OPS_PATHS:
            await ApiError("shutting_down", "the server is shutting down",
                           {"Retry-After": "5", "Connection": "close"}).response()(scope, receive, send)
            return
        status = 500
        limit = None if path.endswith("/ingest") else settings.max_json_bytes  # ingest counts its own
        if limit is not None:
            length = _content_length(scope)
            if length is not None and length > limit:
                await ApiError("body_too_large", f"request body over {limit} bytes").response()(
                    scope, receive, send)
                return
            receive = _limited(receive, limit)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        fapp.state.inflight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            fapp.state.inflight -= 1
            route = scope.get("route")
            fapp.state.metrics.http_requests.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status)).inc()


def _content_length(scope: Scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _limited(receive: Receive, limit: int) -> Receive:
    total = 0

    async def wrapped() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:  # FastAPI re-raises HTTPException from body reading as is
                raise StarletteHTTPException(413, f"request body over {limit} bytes")
        return message

    return wrapped
