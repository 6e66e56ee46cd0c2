"""Probes, metrics, the model list and the OpenAPI document."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..app import Engine, engine
from ..auth import tenant
from ..errors import ApiError
from ..metrics import CONTENT_TYPE
from ..schemas import ErrorBody, Health, ModelCard, ModelList

router = APIRouter()
ERRORS = {401: {"model": ErrorBody}, 503: {"model": ErrorBody}}


@router.get("/health", response_model=Health, tags=["ops"])
async def health(request: Request) -> Health:
    """Liveness: the process answers (open, no key). 503 only if the engine failed to start."""
    if request.app.state.load_error:
        raise ApiError(503, "not_ready", f"the engine failed to start: {request.app.state.load_error}")
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": ErrorBody}}, tags=["ops"])
async def ready(request: Request) -> Health:
    """Readiness (open, no key): the model is loaded and the store answers; 503 until then, and
    while draining."""
    eng = engine(request)
    try:
        ok = await asyncio.wait_for(asyncio.to_thread(eng.store.ping), timeout=5)
    except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
        ok = False
    if not ok:
        raise ApiError(503, "store_unavailable", "the session store does not answer", {"Retry-After": "1"})
    return Health(status="ready", model=eng.model_id)


@router.get("/metrics", response_class=Response, responses=ERRORS, tags=["ops"])
async def metrics(request: Request, _: str = Depends(tenant)) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def model_card(eng: Engine) -> ModelCard:
    return ModelCard(id=eng.model_id, created=eng.created, fingerprint=eng.atlas.fingerprint)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
async def list_models(_: str = Depends(tenant), eng: Engine = Depends(engine)) -> ModelList:
    """The one model this server runs."""
    return ModelList(data=[model_card(eng)])


@router.get("/v1/models/{model_id}", response_model=ModelCard,
            responses={**ERRORS, 404: {"model": ErrorBody}}, tags=["openai"])
async def get_model(model_id: str, _: str = Depends(tenant), eng: Engine = Depends(engine)) -> ModelCard:
    if model_id != eng.model_id:
        raise ApiError(404, "model_not_found", f"this server runs model {eng.model_id!r}")
    return model_card(eng)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _: str = Depends(tenant)) -> JSONResponse:
    """The OpenAPI document (behind the same key as everything else)."""
    return JSONResponse(request.app.openapi())
