"""`create_app(settings)`: the FastAPI application, its lifespan, routers and middleware."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from service import errors
from service.deps import require_api_key
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware
from service.routes import collections, health, jobs, points, search
from service.runtime import Runtime
from service.settings import Settings

logger = logging.getLogger(__name__)

DESCRIPTION = """
tandem: vector retrieval with binary codes in RAM, full vectors on disk, and an ONNX text
encoder inside. Send `text` (encoded by the collection's encoder) or `vector`.

Every error body is `{"error": {"type", "message", "request_id"}}`; every response carries
`x-request-id`. When the server has an API key, every route but `/livez`, `/readyz` and
`/metrics` needs `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    runtime = Runtime(settings, metrics)

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
    errors.install(app)
    app.include_router(health.router)
    protected = [Depends(require_api_key)]
    for router in (collections.router, points.router, search.router, jobs.router):
        app.include_router(router, dependencies=protected, responses={401: {"description": "missing or wrong API key"}})
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
        access_log=settings.access_log,
    )
    return app
