"""`create_app(settings)`: the FastAPI application, its lifespan, routers and middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from service import errors
from service.compat import openai, qdrant
from service.deps import require_api_key
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import collections, health, jobs, payload, points, search
from service.runtime import Runtime
from service.schemas import ErrorBody
from service.settings import Settings

logger = logging.getLogger(__name__)

DESCRIPTION = """
tandem: vector retrieval with binary codes in RAM, full vectors on disk, and an ONNX text
encoder inside. Send `text` (encoded by the collection's encoder) or `vector`.

Every error body is `{"error": {"type", "message", "request_id"}}`; every response carries
`x-request-id`. When the server has an API key, every route but `/livez`, `/readyz` and
`/metrics` needs `Authorization: Bearer <key>`.
"""


#: What any route behind the API key may answer besides its own success: the one error shape.
ERROR_RESPONSES = errors.documented(ErrorBody, {
    400: "malformed request: not JSON, invalid UTF-8, an unsafe collection name",
    401: "missing or wrong API key",
    404: "no such collection, point, job or route",
    405: "method not allowed on this route",
    409: "a collection of that name exists with another configuration",
    413: "body or batch over the configured limits",
    415: "unsupported content type",
    422: "well-formed but invalid: wrong dimension, NaN, bad filter, k out of range...",
    429: "overloaded: the search queue is full; retry later",
    500: "a bug: the log holds the details under the request id",
    503: "starting, shutting down, an encoder or a collection unavailable",
    507: "the data volume is full: nothing of the request was written",
})


def create_app(settings: Settings, *, registry: Any = None, load_encoder: Any = None,
               load_files: Any = None) -> FastAPI:
    """The HTTP app. ``registry``: where collections live (default: ``settings.data_dir`` on
    this node; cluster mode passes ``service.cluster.sharded.ClusterRegistry``).
    ``load_encoder``: builds the text encoder (default: onnxruntime in this process; cluster
    mode passes one over its encoder deployment). ``load_files``: runs file ingestion jobs
    (default: in this process; cluster mode passes one on Ray Data)."""
    metrics = Metrics()
    runtime = Runtime(settings, metrics, registry=registry, load_encoder=load_encoder, load_files=load_files)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading runs beside the server so that /livez answers and /readyz says 503 meanwhile.
        starting = asyncio.get_running_loop().create_task(runtime.start(), name="startup")
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await runtime.stop()

    app = FastAPI(
        title="tandem", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.settings = settings
    errors.install(app, dialects={openai.ERROR_PREFIX: openai.error_body, qdrant.ERROR_PREFIX: qdrant.error_body})
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    for router in (collections.router, points.router, search.router, payload.router, jobs.router):
        app.include_router(router, dependencies=protected, responses=ERROR_RESPONSES)
    app.include_router(openai.router, dependencies=protected, responses=openai.ERROR_RESPONSES)
    app.include_router(qdrant.router, responses=qdrant.ERROR_RESPONSES)  # its own key check: api-key or Bearer
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
        access_log=settings.access_log, max_in_flight=settings.max_in_flight,
    )
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = integer_bounds(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def integer_bounds(node: Any) -> Any:
    """OpenAPI documents as FastAPI renders them hold every bound as a float (`"minimum": 1.0`),
    and generators then send `1.0` for an integer; the bounds of integers become integers again."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(bound), float) and node[bound].is_integer():
                    node[bound] = int(node[bound])
        for value in node.values():
            integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            integer_bounds(value)
    return node
