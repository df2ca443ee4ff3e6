"""A Qdrant-compatible REST subset under ``/qdrant``, so that the official client works unchanged:
``QdrantClient(url="http://host:8000", prefix="qdrant", api_key=...)`` (REST, not gRPC).

Translated onto tandem's own runtime calls (the registry, ``Runtime.upsert``, ``Runtime.search``,
``Runtime.delete``, the collection's count, scroll and payload indexes); nothing is searched or
written here.

- Collections: create (``vectors: {size, distance}``; Cosine or Dot), get, list, delete, exists.
  Accepted and ignored: ``hnsw_config``, ``optimizers_config``, ``wal_config``,
  ``quantization_config``, ``shard_number``, ``sharding_method``, ``replication_factor``,
  ``write_consistency_factor``, ``on_disk_payload``, ``strict_mode_config``, ``metadata``, and in
  ``vectors`` ``on_disk``, ``hnsw_config``, ``quantization_config``, ``datatype``, ``multivector_config``.
- Points: upsert (records or a batch; integer or UUID ids), retrieve, delete by ids or by filter,
  scroll (id order), count; search and ``query`` (a vector, ``limit``, ``offset``,
  ``with_payload``, ``with_vector``, ``score_threshold``, ``filter``); payload indexes.
- Filters: ``must`` / ``should`` / ``must_not`` at any depth; ``match`` value, any, except;
  ``range`` and datetime ranges; ``is_empty``; ``is_null``; ``has_id``.
- Not supported (an error in Qdrant's shape that names it): named and sparse vectors, Euclid and
  Manhattan distances, text/geo/values-count/nested conditions, ``min_should``, prefetch and
  fusion queries, snapshots, shard keys, aliases.
- Auth: Qdrant's ``api-key`` header, or tandem's ``Authorization: Bearer``.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from index import CollectionConfig
from service import schemas
from service.compat import qdrant_schemas as qs
from service.compat.qdrant_filters import to_filter
from service.deps import CollectionName, ReadyRuntime
from service.errors import BadRequest, ConfigConflict, NotFound, Unauthorized, documented
from service.registry import OpenCollection, check_name
from service.routes.points import PointIdSegment, parse_id
from service.runtime import Runtime

ERROR_PREFIX = "/qdrant"
#: The Qdrant REST API version this layer follows (qdrant-client checks it on connect).
QDRANT_VERSION = "1.20.0"
_DISTANCES = {"Cosine": "cosine", "Dot": "dot"}
_INDEX_TYPES = {"keyword": "keyword", "integer": "integer", "float": "float", "bool": "bool",
                "datetime": "datetime"}


class ErrorStatus(BaseModel):
    error: str


class ErrorBody(BaseModel):
    """Qdrant's error body."""

    status: ErrorStatus
    time: float


ERROR_RESPONSES = documented(ErrorBody, {
    400: "malformed, invalid or unsupported request (Qdrant answers 400 where tandem's own routes say 422)",
    401: "missing or wrong API key",
    404: "no such collection, point or route",
    409: "the collection exists",
    413: "body or batch over the configured limits",
    429: "overloaded; retry later",
    500: "a bug: the log holds the details under the request id",
    503: "not ready yet",
})


def error_body(status: int, type_: str, message: str) -> tuple[int, dict[str, Any]]:
    """Qdrant's error shape; a validation error is a 400 there (tandem says 422)."""
    return (400 if status == 422 else status), {"status": {"error": message}, "time": 0.0}


def require_key(request: Request) -> None:
    """Qdrant's ``api-key`` header or tandem's bearer token, when the server has a key."""
    key = request.app.state.runtime.settings.api_key
    if key is None:
        return
    bearer = request.headers.get("authorization", "")
    given = request.headers.get("api-key") or (bearer[len("Bearer "):] if bearer.startswith("Bearer ") else "")
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send the 'api-key' header (or 'Authorization: Bearer')")


router = APIRouter(prefix="/qdrant", tags=["qdrant"], dependencies=[Depends(require_key)])
Name = CollectionName  # documented as tandem's own routes document it; checked by check_name
Wait = Annotated[bool, Query(description="accepted; writes are always durable when answered")]
JsonBody = Annotated[dict[str, Any], Body(default_factory=dict)]


def _ok(result: Any, t0: float) -> dict[str, Any]:
    return {"result": result, "status": "ok", "time": time.perf_counter() - t0}


def _completed(t0: float) -> dict[str, Any]:
    return _ok({"operation_id": 0, "status": "completed"}, t0)


def _open(runtime: Runtime, name: str) -> OpenCollection:
    return runtime.registry.get(check_name(name))


def _number(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


# -- points out -----------------------------------------------------------------------------------
def _payload(payload: dict[str, Any] | None, selector: Any) -> dict[str, Any] | None:
    if selector is True:
        return payload or {}
    if not selector or payload is None:
        return None
    if isinstance(selector, list):
        return {k: v for k, v in payload.items() if k in selector}
    if isinstance(selector, dict) and isinstance(selector.get("include"), list):
        return {k: v for k, v in payload.items() if k in selector["include"]}
    if isinstance(selector, dict) and isinstance(selector.get("exclude"), list):
        return {k: v for k, v in payload.items() if k not in selector["exclude"]}
    raise BadRequest("with_payload must be true, false, a list of keys, or {include|exclude: [keys]}")


async def _vectors(opened: OpenCollection, ids: list[Any], wanted: Any) -> dict[Any, list[float]]:
    if not wanted:
        return {}
    points = await run_in_threadpool(lambda: [opened.guarded(opened.collection.get, i) for i in ids])
    return {p.id: p.vector.tolist() for p in points if p is not None}


async def _records(opened: OpenCollection, found: list[tuple[Any, dict[str, Any] | None]],
                   with_payload: Any, with_vector: Any) -> list[dict[str, Any]]:
    vectors = await _vectors(opened, [i for i, _ in found], with_vector)
    return [{"id": i, "payload": _payload(p, with_payload), "vector": vectors.get(i)} for i, p in found]


# -- collections ----------------------------------------------------------------------------------
@router.get("", summary="version (qdrant-client checks it on connect)")
@router.get("/", include_in_schema=False)
async def root() -> dict[str, Any]:
    return {"title": "tandem (Qdrant-compatible API)", "version": QDRANT_VERSION}


@router.get("/collections", summary="list collections")
async def list_collections(runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    return _ok({"collections": [{"name": n} for n in runtime.registry.names()]}, t0)


@router.get("/collections/{name}/exists", summary="whether a collection exists")
async def exists(name: Name, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    return _ok({"exists": check_name(name) in runtime.registry.names()}, t0)


@router.put("/collections/{name}", summary="create a collection",
              openapi_extra=qs.body(qs.CREATE_COLLECTION))
async def create_collection(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_name(name)
    for unsupported in ("sparse_vectors", "init_from"):
        if body.get(unsupported):
            raise BadRequest(f"{unsupported} is not supported by tandem's Qdrant API")
    vectors = body.get("vectors")
    if not isinstance(vectors, dict) or "size" not in vectors:
        raise BadRequest("vectors must be {'size': ..., 'distance': 'Cosine' | 'Dot'}; named vectors are not supported")
    distance = vectors.get("distance", "Cosine")
    if not isinstance(distance, str) or distance not in _DISTANCES:
        raise BadRequest(f"distance {distance!r} is not supported: use Cosine or Dot")
    try:
        config = CollectionConfig(dim=vectors["size"], metric=_DISTANCES[distance])
    except ValidationError as exc:
        raise BadRequest(f"vectors.size: {exc.errors()[0]['msg']}") from None
    if name in runtime.registry.names():
        raise ConfigConflict(f"Collection `{name}` already exists!")
    await run_in_threadpool(runtime.registry.create, name, config, None)
    return _ok(True, t0)


@router.get("/collections/{name}", summary="describe a collection")
async def get_collection(name: Name, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    col = opened.collection
    points = col.count()
    indexes = await run_in_threadpool(opened.guarded, col.payload_indexes)
    distance = {v: k for k, v in _DISTANCES.items()}[col.config.metric]
    return _ok({
        "status": "green", "optimizer_status": "ok", "indexed_vectors_count": points, "points_count": points,
        "segments_count": 1,
        "config": {
            "params": {"vectors": {"size": col.config.dim, "distance": distance}, "shard_number": 1,
                       "replication_factor": 1, "write_consistency_factor": 1, "on_disk_payload": True},
            # tandem has no HNSW graph: the fields Qdrant's clients require, zero.
            "hnsw_config": {"m": 0, "ef_construct": 0, "full_scan_threshold": 0},
            "optimizer_config": {"default_segment_number": 1, "flush_interval_sec": 0},
        },
        "payload_schema": {k: {"data_type": v["type"], "points": v["points"]} for k, v in indexes.items()},
    }, t0)


@router.delete("/collections/{name}", summary="delete a collection")
async def delete_collection(name: Name, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    existed = check_name(name) in runtime.registry.names()
    if existed:
        await run_in_threadpool(runtime.registry.drop, name)
        runtime.metrics.forget_collection(name)
    return _ok(existed, t0)


@router.put("/collections/{name}/index", summary="create a payload index",
              openapi_extra=qs.body(qs.CREATE_INDEX))
async def create_index(name: Name, body: JsonBody, runtime: ReadyRuntime, wait: Wait = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    schema = body.get("field_schema")
    kind = schema.get("type") if isinstance(schema, dict) else schema
    if not isinstance(kind, str) or kind not in _INDEX_TYPES:
        raise BadRequest(f"field_schema {kind!r} is not supported: use one of {', '.join(_INDEX_TYPES)}")
    await run_in_threadpool(opened.guarded, opened.collection.create_payload_index, body.get("field_name"),
                            _INDEX_TYPES[kind])
    return _completed(t0)


@router.delete("/collections/{name}/index/{field_name}", summary="delete a payload index")
async def delete_index(name: Name, field_name: str, runtime: ReadyRuntime, wait: Wait = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    await run_in_threadpool(opened.guarded, opened.collection.drop_payload_index, field_name)
    return _completed(t0)


# -- points ---------------------------------------------------------------------------------------
@router.put("/collections/{name}/points", summary="upsert points (records or a batch)",
              openapi_extra=qs.body(qs.UPSERT))
async def upsert(name: Name, body: JsonBody, runtime: ReadyRuntime, wait: Wait = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    records: Any
    if "batch" in body:
        batch = body["batch"]
        if not isinstance(batch, dict):
            raise BadRequest("batch must be {'ids': [...], 'vectors': [...], 'payloads': [...]}")
        ids, vectors, payloads = (batch.get(k) or [] for k in ("ids", "vectors", "payloads"))
        if not all(isinstance(x, list) for x in (ids, vectors, payloads)):
            raise BadRequest("batch: ids, vectors and payloads must be lists")
        payloads = payloads or [None] * len(ids)
        records = [{"id": i, "vector": v, "payload": p} for i, v, p in zip(ids, vectors, payloads, strict=False)]
        if not len(ids) == len(vectors) == len(payloads):
            raise BadRequest("batch: ids, vectors and payloads must be as long as each other")
    else:
        records = body.get("points")
        if not isinstance(records, list):
            raise BadRequest("give 'points': [{'id', 'vector', 'payload'}] or a 'batch'")
    points = []
    for i, record in enumerate(records):
        vector = _unnamed(record.get("vector")) if isinstance(record, dict) else None
        if isinstance(vector, dict):
            raise BadRequest(f"points[{i}]: named and sparse vectors are not supported; send a list of numbers")
        try:
            points.append(schemas.PointIn(id=record.get("id"), vector=vector, payload=record.get("payload")))
        except (ValidationError, AttributeError) as exc:
            raise BadRequest(f"points[{i}]: {exc}") from None
    await runtime.upsert(opened, points)
    return _completed(t0)


@router.post("/collections/{name}/points", summary="retrieve points by id",
              openapi_extra=qs.body(qs.RETRIEVE))
async def retrieve(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise BadRequest("give 'ids': [...]")
    points = await run_in_threadpool(lambda: [opened.guarded(opened.collection.get, i) for i in ids])
    found = [p for p in points if p is not None]
    out = [{"id": p.id, "payload": _payload(p.payload, body.get("with_payload", True)),
            "vector": p.vector.tolist() if body.get("with_vector") else None} for p in found]
    return _ok(out, t0)


@router.get("/collections/{name}/points/{point_id}", summary="one point")
async def get_point(name: Name, point_id: PointIdSegment, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    key = parse_id(point_id, "auto")  # as tandem's own GET: ASCII digits are an integer id
    point = await run_in_threadpool(opened.guarded, opened.collection.get, key)
    if point is None:
        raise NotFound(f"No point with id {point_id} found")
    return _ok({"id": point.id, "payload": point.payload or {}, "vector": point.vector.tolist()}, t0)


@router.post("/collections/{name}/points/delete", summary="delete points by ids or by filter",
              openapi_extra=qs.body(qs.DELETE))
async def delete(name: Name, body: JsonBody, runtime: ReadyRuntime, wait: Wait = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    if "points" in body:
        ids = body["points"]
    elif "filter" in body:
        flt = to_filter(body["filter"])
        ids = await run_in_threadpool(_all_ids, opened, flt)
    else:
        raise BadRequest("give 'points': [ids] or 'filter'")
    if ids:
        await runtime.delete(opened, list(ids))
    return _completed(t0)


def _all_ids(opened: OpenCollection, flt: dict[str, Any] | None) -> list[Any]:
    ids: list[Any] = []
    offset = None
    while True:
        page, offset = opened.guarded(opened.collection.scroll, filter=flt, limit=10_000, offset=offset,
                                      with_payload=False)
        ids += [key for key, _ in page]
        if offset is None:
            return ids


@router.post("/collections/{name}/points/scroll", summary="points in id order, a page at a time",
              openapi_extra=qs.body(qs.SCROLL))
async def scroll(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    if body.get("order_by"):
        raise BadRequest("order_by is not supported: points come in id order")
    page, after = await run_in_threadpool(
        opened.guarded, opened.collection.scroll, filter=to_filter(body.get("filter")),
        limit=_number(body, "limit", 10, 1, 10_000), offset=body.get("offset"), with_payload=True,
    )
    records = await _records(opened, page, body.get("with_payload", True), body.get("with_vector"))
    return _ok({"points": records, "next_page_offset": after}, t0)


@router.post("/collections/{name}/points/count", summary="how many points pass a filter",
              openapi_extra=qs.body(qs.COUNT))
async def count(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    opened = _open(runtime, name)
    n = await run_in_threadpool(opened.guarded, opened.collection.count, to_filter(body.get("filter")))
    return _ok({"count": n}, t0)


def _unnamed(vector: Any) -> Any:
    """The default vector's name is "" (LangChain names it so): ``{"": v}`` and
    ``{"name": "", "vector": v}`` are ``v``."""
    if isinstance(vector, dict) and set(vector) == {""}:
        return vector[""]
    if isinstance(vector, dict) and vector.get("name") == "" and "vector" in vector:
        return vector["vector"]
    return vector


async def _search(opened: OpenCollection, runtime: Runtime, vector: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    vector = _unnamed(vector)
    if isinstance(vector, dict) or not isinstance(vector, list):
        raise BadRequest("the query must be a list of numbers: named, sparse and multi-vector queries are not "
                         "supported")
    limit, offset = _number(body, "limit", 10, 1, 10_000), _number(body, "offset", 0, 0, 10_000)
    with_payload = body.get("with_payload", False)
    try:
        request = schemas.SearchRequest(vector=vector, k=limit + offset, filter=to_filter(body.get("filter")),
                                        with_payload=bool(with_payload))
    except ValidationError as exc:
        raise BadRequest(str(exc)) from None
    hits = (await runtime.search(opened, request)).hits[offset:]
    threshold = body.get("score_threshold")
    if threshold is not None and (not isinstance(threshold, int | float) or isinstance(threshold, bool)):
        raise BadRequest("score_threshold must be a number")
    if threshold is not None:
        hits = [h for h in hits if h.score >= threshold]
    vectors = await _vectors(opened, [h.id for h in hits], body.get("with_vector"))
    return [{"id": h.id, "version": 0, "score": h.score, "payload": _payload(h.payload, with_payload),
             "vector": vectors.get(h.id)} for h in hits]


@router.post("/collections/{name}/points/search", summary="nearest points to a vector",
              openapi_extra=qs.body(qs.SEARCH))
async def search(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    return _ok(await _search(_open(runtime, name), runtime, body.get("vector"), body), t0)


@router.post("/collections/{name}/points/query", summary="nearest points to a vector (the Query API)",
              openapi_extra=qs.body(qs.QUERY))
async def query(name: Name, body: JsonBody, runtime: ReadyRuntime) -> dict[str, Any]:
    t0 = time.perf_counter()
    for unsupported in ("prefetch", "using", "lookup_from"):
        if body.get(unsupported):  # using "" is the default vector
            raise BadRequest(f"{unsupported} is not supported by tandem's Qdrant API")
    q = body.get("query")
    vector = q.get("nearest") if isinstance(q, dict) else q
    return _ok({"points": await _search(_open(runtime, name), runtime, vector, body)}, t0)


async def _snapshots(name: Name) -> dict[str, Any]:
    raise BadRequest("snapshots are not supported by tandem's Qdrant API (tandem's online backup: see the README)")


async def _shards(name: Name) -> dict[str, Any]:
    raise BadRequest("shard keys are not supported by tandem's Qdrant API")


async def _aliases() -> dict[str, Any]:
    raise BadRequest("aliases are not supported by tandem's Qdrant API")


for _path, _endpoint, _what in (("/collections/{name}/snapshots", _snapshots, "snapshots"),
                                ("/collections/{name}/shards", _shards, "shard_keys"),
                                ("/collections/aliases", _aliases, "aliases")):
    for _method in ("GET", "POST", "PUT"):
        # Refused with Qdrant's error shape, and left out of the OpenAPI document: not part of the API.
        router.add_api_route(_path, _endpoint, methods=[_method], include_in_schema=False)
