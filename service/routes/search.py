"""POST /collections/{name}/search and /search/batch."""

from __future__ import annotations

import time

from fastapi import APIRouter

from service.deps import CollectionDep, ReadyRuntime
from service.schemas import SearchBatch, SearchBatchResponse, SearchRequest, SearchResponse

router = APIRouter(prefix="/collections/{name}/search", tags=["search"])


@router.post(
    "", response_model=SearchResponse,
    summary="the k nearest points to a text or a vector",
    responses={422: {"description": "text for a collection without an encoder, wrong dim, bad filter"},
               429: {"description": "the search queue is full (--search-queue-size): retry later"}},
)
async def search(body: SearchRequest, opened: CollectionDep, runtime: ReadyRuntime) -> SearchResponse:
    return await runtime.search(opened, body)


@router.post(
    "/batch", response_model=SearchBatchResponse,
    summary="several searches in one request; texts are encoded together",
    responses={413: {"description": "more searches than --max-batch-searches"}},
)
async def search_batch(body: SearchBatch, opened: CollectionDep, runtime: ReadyRuntime) -> SearchBatchResponse:
    t0 = time.perf_counter()
    results = await runtime.search_batch(opened, body.searches)
    return SearchBatchResponse(results=results, took_ms=(time.perf_counter() - t0) * 1000)
