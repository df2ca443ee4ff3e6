"""Probes and metrics: open to everyone, even when an API key is set."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from service.deps import RuntimeDep
from service.errors import NotReady, error_body, type_name
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorBody, Status

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Status, summary="the process answers")
async def livez() -> Status:
    return Status(status="alive")


@router.get(
    "/readyz", response_model=Status, summary="ready to serve",
    responses={503: {"model": ErrorBody, "description": "still loading, shutting down, or start-up failed"}},
)
async def readyz(runtime: RuntimeDep) -> Status | JSONResponse:
    try:
        runtime.require_ready()
    except NotReady as exc:
        return JSONResponse(error_body(type_name(exc), str(exc)), status_code=503)
    return Status(status="ready")


@router.get("/metrics", summary="Prometheus text format", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE)
