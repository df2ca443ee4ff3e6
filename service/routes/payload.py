"""Payload indexes (PUT/GET/DELETE /collections/{name}/index), and the filter aggregates built on
them: POST /collections/{name}/count and /facet."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from index.filters import KEY_PATTERN
from service.deps import CollectionDep
from service.errors import NotFound
from service.registry import OpenCollection
from service.schemas import (
    CountRequest,
    CountResponse,
    FacetRequest,
    FacetResponse,
    FacetValue,
    PayloadIndexCreate,
    PayloadIndexCreated,
    PayloadIndexInfo,
    PayloadIndexList,
)

router = APIRouter(prefix="/collections/{name}", tags=["payload indexes"])


def indexes(opened: OpenCollection) -> list[PayloadIndexInfo]:
    return [PayloadIndexInfo(key=key, **about) for key, about in opened.collection.payload_indexes().items()]


@router.put(
    "/index", response_model=PayloadIndexCreated, status_code=201,
    summary="index a payload key (201), built over the existing points; 200 if indexed so already",
    responses={200: {"model": PayloadIndexCreated},
               422: {"description": "unknown type, or a malformed key"}},
)
async def create_index(body: PayloadIndexCreate, opened: CollectionDep, response: Response) -> PayloadIndexCreated:
    created = await run_in_threadpool(opened.guarded, opened.collection.create_payload_index, body.key, body.type)
    if not created:
        response.status_code = 200
    found = next(i for i in await run_in_threadpool(indexes, opened) if i.key == body.key)
    return PayloadIndexCreated(status="created" if created else "exists", index=found)


@router.get("/index", response_model=PayloadIndexList, summary="the collection's payload indexes, with their RAM")
async def list_indexes(opened: CollectionDep) -> PayloadIndexList:
    return PayloadIndexList(indexes=await run_in_threadpool(indexes, opened))


@router.delete(
    "/index/{key}", response_model=PayloadIndexList,
    summary="drop a payload index (filters on the key keep working, slower); lists those left",
    responses={404: {"description": "the key has no index"}},
)
async def drop_index(
    key: str = Path(..., pattern=KEY_PATTERN, max_length=256), *, opened: CollectionDep
) -> PayloadIndexList:
    if not await run_in_threadpool(opened.guarded, opened.collection.drop_payload_index, key):
        raise NotFound(f"collection {opened.name!r} has no payload index on {key!r}: GET .../index lists them")
    return PayloadIndexList(indexes=await run_in_threadpool(indexes, opened))


@router.post(
    "/count", response_model=CountResponse, summary="how many points pass a filter (exact)",
    responses={422: {"description": "a malformed filter, or a condition the key's index cannot answer"}},
)
async def count(body: CountRequest, opened: CollectionDep) -> CountResponse:
    n, indexed = await run_in_threadpool(opened.guarded, opened.collection.count_detailed, body.filter)
    return CountResponse(count=n, filter_indexed=indexed)


@router.post(
    "/facet", response_model=FacetResponse,
    summary="points per string or boolean value of a key, among those that pass a filter",
    responses={422: {"description": "the key is indexed as a number or datetime, or a malformed filter"}},
)
async def facet(body: FacetRequest, opened: CollectionDep) -> FacetResponse:
    found, indexed = await run_in_threadpool(
        opened.guarded, opened.collection.facet, body.key, filter=body.filter, limit=body.limit
    )
    return FacetResponse(key=body.key, values=[FacetValue(value=v, count=c) for v, c in found], indexed=indexed)
