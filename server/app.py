"""The FastAPI app: ``create_app(settings, atlas=None, store=None)``.

The app is thin: routes validate and authorise, then call the engine runtime. The lifespan builds
the ``Services`` the routes depend on (model, store, runtime; ``dependencies.py``) and, on shutdown,
drains: new requests get 503, in-flight ones get up to ``ATLAS_DRAIN_TIMEOUT_S`` to finish, then the
runtime and the store are closed. The runtime saves each session at the end of every operation (and
every ``ATLAS_CHECKPOINT_TOKENS`` of an ingest), so there is nothing dirty to flush at shutdown
beyond waiting for those saves.

Middleware, outermost first (each a pure ASGI app: none buffers a stream, and the request's context,
with its id, reaches the code that runs inside a streaming response):

- ``RequestIdMiddleware``: keeps a sane incoming ``X-Request-ID`` or makes one, puts it in the
  context (log lines, error bodies: ``logs.py``, ``errors.py``) and on every response;
- ``AtlasCORS`` (only with ``ATLAS_CORS_ORIGINS``): answers preflights before anything asks for a key
  or refuses a draining server, and adds its headers to every answer, errors included, so a page
  can read a 401 or a 429;
- ``CatchAll``: an exception no handler took becomes the JSON 500 here, inside the two above (so it
  carries the id and the CORS headers), not in Starlette's outermost ``ServerErrorMiddleware``;
- ``RequestGate``: 503 while draining, the key of a request with a body (401 before the body is
  read or checked), JSON body cap, request counts.

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
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atlas.engine import Atlas
from atlas.engine.checkpoint import CheckpointError
from atlas.engine.machine import has_bf16_matmul_units
from atlas.engine.runtime import Runtime, RuntimeSettings
from atlas.engine.store import StateStore, StoreSettings, open_store
from atlas.engine.threads import apply_thread_policy
from atlas.kernels.settings import kernel_settings

from .auth import resolve_tenant
from .dependencies import DemoBaseline, Services, json_content
from .errors import ApiError, error_response, install_handlers, unexpected_response
from .logs import new_request_id, request_id, valid_request_id
from .metrics import Metrics
from .routes import chat, completions, demo, ops, playground, sessions, tokenize
from .settings import ServerSettings

log = logging.getLogger("atlas.server")

#: Paths served while loading and while draining (probes and scrapes).
OPS_PATHS = {"/health", "/ready", "/metrics"}
REQUEST_ID_HEADER = "X-Request-ID"
#: Response headers a page's JavaScript may read (CORS hides all but a few by default).
CORS_EXPOSE = [REQUEST_ID_HEADER, "Retry-After"]
CORS_METHODS = ["GET", "POST", "PATCH", "DELETE", "OPTIONS"]  # every method a route takes


def default_model_id(settings: ServerSettings) -> str:
    if settings.model_id:
        return settings.model_id
    return Path(settings.model).resolve().name if settings.model else "atlas-demo"


def build_services(settings: ServerSettings, atlas: Atlas | None, store: StateStore | None,
                   runtime_settings: RuntimeSettings | None) -> Services:
    """Load the model, open the store, start the runtime (blocking; run in a thread)."""
    import torch

    if atlas is None:
        atlas = Atlas.load(settings.model, device=settings.device, dtype=getattr(torch, settings.dtype))
    # Threads from the model's size and the cores really available (engine/threads.py): torch's
    # default collapses 15-50x as soon as another process wants a core.
    apply_thread_policy(atlas.parameters, override=settings.torch_threads)
    emulated_bf16 = atlas.device.type == "cpu" and has_bf16_matmul_units() is False
    if emulated_bf16 and kernel_settings().ns_precision == "bf16":
        log.warning("ATLAS_NS_PRECISION=bf16 on a CPU without bf16 matrix units (AMX, AVX512-BF16): its "
                    "bf16 products are emulated and slower than fp32; unset it here")
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
                app.state.load_error = ("checkpoint_invalid", f"the model cannot be loaded: {e}")
            except Exception as e:
                log.exception("could not start the engine")
                app.state.load_error = ("not_ready", f"the engine failed to start: {type(e).__name__}: {e}")

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
    app.state.metrics = Metrics(lambda: app.state.services)
    app.state.demo_baseline = DemoBaseline()
    install_handlers(app)
    app.include_router(ops.router)
    app.include_router(sessions.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.include_router(demo.router)
    app.include_router(playground.router)
    # add_middleware puts each outside the ones before it: the gate is innermost, the id outermost.
    app.add_middleware(RequestGate)
    app.add_middleware(CatchAll)
    origins = settings.cors_origin_list
    if origins:
        # Keys travel in the Authorization header, never in cookies: no credentials mode, so "*" is
        # safe to offer. Requested headers are mirrored ("*"), so Authorization, Content-Type,
        # X-Request-ID and an SDK's own headers (OpenAI's x-stainless-*) all pass a preflight.
        app.add_middleware(AtlasCORS, allow_origins=origins, allow_methods=CORS_METHODS,
                           allow_headers=["*"], expose_headers=CORS_EXPOSE, max_age=600)
    app.add_middleware(RequestIdMiddleware)
    return app


class RequestIdMiddleware:
    """Pure ASGI middleware: the request's id (a sane X-Request-ID it came with, or a new one) in
    the context for the whole request and on the response's headers, whatever answers it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        rid: str = given if given is not None and valid_request_id(given) else new_request_id()
        # Set, never reset: each request runs in a task of its own (uvicorn's, or the test client's),
        # whose context ends with it; so even the server's own line about a failed request has it.
        request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id for routes
        if given is not None and given != rid:
            log.info("replaced an invalid X-Request-ID header (%d characters) by %s", len(given), rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", []))
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class AtlasCORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the API's error shape (and code)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        what = bytes(response.body).decode(errors="replace").removeprefix("Disallowed CORS ")
        headers = {k: v for k, v in response.headers.items()
                   if k.lower().startswith(("access-control", "vary"))}
        return error_response(response.status_code, "cors_not_allowed",
                              f"CORS preflight refused ({what}): origin {request_headers.get('origin')!r}, "
                              f"method {request_headers.get('access-control-request-method')!r}; "
                              "ATLAS_CORS_ORIGINS lists the origins allowed", headers)


class CatchAll:
    """Pure ASGI middleware: an exception that escaped every handler becomes the JSON 500 (or its
    API error) here, so that the answer passes through the CORS and request-id middleware. Once a
    response has started there is nothing to answer: the exception goes on to the server."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as exc:
            if started:
                raise
            await unexpected_response(Request(scope), exc)(scope, receive, send)


#: Methods whose requests carry a body; every route that takes one needs a key (auth.py).
_WRITES = frozenset({"POST", "PUT", "PATCH"})


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
        if scope["method"] in _WRITES:  # the key before the body: no 415/422 to a stranger
            client = scope.get("client")
            host = client[0] if client else None
            try:
                resolve_tenant(settings, Headers(scope=scope).get("authorization"), host)
            except ApiError as e:
                await e.response()(scope, receive, send)
                return
        status = 500
        # ingest and import count their own bodies (a document; a session file of the state size)
        limit = None if path.endswith(("/ingest", "/v1/sessions/import")) else settings.max_json_bytes
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
