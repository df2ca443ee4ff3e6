"""Points of a collection: upsert, delete, get by id.

Ids are strings or non-negative integers. In the path of GET .../points/{point_id}, a segment
of digits without leading zeros addresses the integer id (``/points/7`` is id ``7``); any
other segment is a string id. For a string id made of digits, add ``?id_type=string``
(``/points/7?id_type=string`` is id ``"7"``).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from service.deps import CollectionDep, ReadyRuntime
from service.errors import BadRequest, NotFound
from service.schemas import DeleteResult, PointOut, PointsDelete, PointsUpsert, UpsertResult

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/collections/{name}/points", tags=["points"])

PointIdSegment = Annotated[str, Path(
    min_length=1, max_length=512,
    description="ASCII digits without leading zeros: the integer id (below 2**63); otherwise a string id",
)]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` inlined, for an `openapi_extra` request body."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


def parse_upsert(raw: bytes) -> PointsUpsert:
    try:
        return PointsUpsert.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


# The body is parsed by pydantic-core straight from bytes, in a worker thread: several times
# faster than json.loads then validation, and it keeps the event loop free for 1,024 x 384
# numbers. FastAPI therefore cannot infer the body's schema; openapi_extra documents it.
_UPSERT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": inline_schema(PointsUpsert)}},
    }
}


@router.put(
    "", response_model=UpsertResult, openapi_extra=_UPSERT_BODY,
    summary="insert or replace points, atomically (all or none)",
    responses={202: {"description": "wait=false: validated and queued, not yet durable"},
               413: {"description": "more points than --max-batch-points"}},
)
async def upsert_points(
    request: Request,
    opened: CollectionDep,
    runtime: ReadyRuntime,
    response: Response,
    wait: Annotated[bool, Query(description="true: answer once durable; false: answer 202 at once")] = True,
) -> UpsertResult:
    body = await run_in_threadpool(parse_upsert, await request.body())
    if wait:
        n = await runtime.upsert(opened, body.points)
        return UpsertResult(status="completed", upserted=n)
    # Check the limit now so that the client learns about it; everything else is logged.
    if len(body.points) > runtime.settings.max_batch_points:
        return UpsertResult(status="completed", upserted=await runtime.upsert(opened, body.points))
    runtime.spawn(runtime.upsert(opened, body.points), what=f"upsert of {len(body.points)} points into {opened.name}")
    response.status_code = 202
    return UpsertResult(status="acknowledged", upserted=len(body.points))


@router.post("/delete", response_model=DeleteResult, summary="delete points by id (unknown ids are ignored)")
async def delete_points(body: PointsDelete, opened: CollectionDep, runtime: ReadyRuntime) -> DeleteResult:
    return DeleteResult(deleted=await runtime.delete(opened, list(body.ids)))


@router.get("/{point_id}", response_model=PointOut, summary="one point by id (see the note on ids)")
async def get_point(
    point_id: PointIdSegment,
    opened: CollectionDep,
    id_type: Annotated[
        Literal["auto", "int", "string"],
        Query(description="auto: digits mean an integer id; string: the segment is a string id"),
    ] = "auto",
    with_vector: bool = True,
) -> PointOut:
    key = parse_id(point_id, id_type)
    point = await run_in_threadpool(opened.guarded, opened.collection.get, key)
    if point is None:
        raise NotFound(f"no point with id {key!r} in collection {opened.name!r}")
    stored = point.vector.tolist() if with_vector else None
    if opened.collection.config.multivector is not None:
        return PointOut(id=point.id, vectors=stored, payload=point.payload)
    return PointOut(id=point.id, vector=stored, payload=point.payload, text=point.text)


def parse_id(segment: str, id_type: str) -> int | str:
    if id_type == "string":
        return segment
    is_int = segment.isascii() and segment.isdigit() and (segment == "0" or not segment.startswith("0"))
    if id_type == "int" and not is_int:
        raise BadRequest(f"point id {segment!r} is not a non-negative integer (id_type=int)")
    return int(segment) if is_int else segment
