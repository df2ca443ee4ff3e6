"""PUT/GET/DELETE /collections/{name}, GET /collections."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from index import RecallMonitor
from service.deps import CollectionDep, CollectionName, ReadyRuntime
from service.errors import Unprocessable
from service.registry import OpenCollection, check_name
from service.routes.payload import indexes
from service.schemas import CollectionCreate, CollectionCreated, CollectionInfo, CollectionList, Dropped, RecallInfo

router = APIRouter(prefix="/collections", tags=["collections"])


def info(opened: OpenCollection, monitor: RecallMonitor) -> CollectionInfo:
    stats = opened.collection.stats()
    return CollectionInfo(
        name=opened.name, config=opened.collection.config, encoder=opened.encoder,
        points=stats.points, ram_bytes=stats.ram_bytes, disk_bytes=stats.disk_bytes,
        created_at=opened.created_at, payload_indexes=indexes(opened), recall=recall(opened, monitor),
    )


def recall(opened: OpenCollection, monitor: RecallMonitor) -> RecallInfo:
    measured = monitor.estimate(opened.name)
    calibration = opened.collection.calibration
    return RecallInfo(
        estimate=measured.estimate, interval=measured.interval, samples=measured.samples,
        samples_total=measured.total, dropped=measured.dropped, target=opened.collection.config.target_recall,
        calibrated_points=None if calibration is None else calibration.rows,
        calibrated_at=None if calibration is None else calibration.measured_at,
    )


@router.put(
    "/{name}", response_model=CollectionCreated, status_code=201,
    summary="create a collection (201); 200 if it exists with this config, 409 if with another",
    responses={200: {"model": CollectionCreated}, 409: {"description": "exists with another config"}},
)
async def create_collection(
    name: CollectionName, body: CollectionCreate, runtime: ReadyRuntime, response: Response
) -> CollectionCreated:
    check_name(name)
    dim = runtime.check_encoder(body.encoder, body.dim)
    config = body.index_config(dim)
    if config.has_sparse and body.encoder is None:
        raise Unprocessable(
            "a sparse stage indexes the points' text, and a collection without an 'encoder' takes only vectors: "
            "give an encoder (e.g. \"encoder\": \"minilm\"), or drop 'sparse'"
        )
    opened, created = await run_in_threadpool(runtime.registry.create, name, config, body.encoder)
    if not created:
        response.status_code = 200
    runtime.metrics.set_points(name, opened.collection.count())
    runtime.metrics.set_recall_target(name, config.target_recall)
    described = await run_in_threadpool(info, opened, runtime.recall)
    return CollectionCreated(status="created" if created else "exists", collection=described)


@router.get("", response_model=CollectionList, summary="every collection, with counts")
async def list_collections(runtime: ReadyRuntime) -> CollectionList:
    opened = [runtime.registry.get(n) for n in runtime.registry.names()]
    return CollectionList(
        collections=await run_in_threadpool(lambda: [info(o, runtime.recall) for o in opened]),
        unavailable=dict(runtime.registry.broken),
    )


@router.get("/{name}", response_model=CollectionInfo, summary="config and counts (points, RAM, disk)")
async def get_collection(opened: CollectionDep, runtime: ReadyRuntime) -> CollectionInfo:
    return await run_in_threadpool(info, opened, runtime.recall)


@router.delete("/{name}", response_model=Dropped, summary="drop a collection and its files")
async def drop_collection(name: CollectionName, runtime: ReadyRuntime) -> Dropped:
    await run_in_threadpool(runtime.registry.drop, check_name(name))  # also one that failed to open
    runtime.metrics.forget_collection(name)
    runtime.recall.forget(name)
    return Dropped(name=name)
