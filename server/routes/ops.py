"""Probes, metrics, the model list and the OpenAPI document."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..dependencies import MetricsDep, Services, ServicesDep, get_services, get_tenant
from ..errors import ApiError
from ..metrics import CONTENT_TYPE
from ..schemas import ErrorBody, Health, ModelCard, ModelList
from .common import Responses

router = APIRouter()
ERRORS: Responses = {401: {"model": ErrorBody}, 503: {"model": ErrorBody}}
#: Routes that need a key but not the caller's tenant.
AUTH = [Depends(get_tenant)]


@router.get("/health", response_model=Health, tags=["ops"])
async def health(request: Request) -> Health:
    """Liveness: the process answers (open, no key). 503 only if the engine failed to start."""
    if request.app.state.load_error:
        raise ApiError(*request.app.state.load_error)
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": ErrorBody}}, tags=["ops"])
async def ready(request: Request) -> Health:
    """Readiness (open, no key): the model is loaded and the store answers; 503 until then, and
    while draining."""
    services = get_services(request)
    try:
        ok = await asyncio.wait_for(asyncio.to_thread(services.store.ping), timeout=5)
    except Exception:  # noqa: BLE001 - any failure to answer is "not ready"
        ok = False
    if not ok:
        raise ApiError("store_unavailable", "the session store does not answer", {"Retry-After": "1"})
    return Health(status="ready", model=services.model_id)


@router.get("/metrics", response_class=Response, responses=ERRORS, tags=["ops"], dependencies=AUTH)
async def metrics(app_metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(app_metrics.render(), media_type=CONTENT_TYPE)


def model_card(services: Services) -> ModelCard:
    a = services.atlas
    return ModelCard(id=services.model_id, created=services.created, fingerprint=a.fingerprint,
                     parameters=a.parameters, weight_bytes=a.weight_bytes,
                     dtype=a.dtype_name, state_bytes=services.state_bytes,
                     vocab_size=a.config.vocab_size)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"], dependencies=AUTH)
async def list_models(services: ServicesDep) -> ModelList:
    """The one model this server runs."""
    return ModelList(data=[model_card(services)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            responses={**ERRORS, 404: {"model": ErrorBody}}, tags=["openai"], dependencies=AUTH)
async def get_model(model_id: str, services: ServicesDep) -> ModelCard:
    if model_id != services.model_id:
        raise ApiError("model_not_found", f"this server runs model {services.model_id!r}")
    return model_card(services)


@router.get("/openapi.json", include_in_schema=False, dependencies=AUTH)
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI document (behind the same key as everything else)."""
    return JSONResponse(request.app.openapi())
