"""Ingestion jobs: POST /collections/{name}/ingest (an NDJSON body) or .../ingest/files (files
under --import-dir) starts one, GET /jobs/{job_id} follows it."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.deps import CollectionDep, ReadyRuntime
from service.errors import NotFound, documented
from service.schemas import ErrorBody, FileIngest, JobAccepted, JobList, JobState

router = APIRouter(tags=["ingestion"])

JobStateName = Literal["running", "completed", "failed"]

_NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "description": "one point per line, the shape of PUT .../points' items: "
        '{"id": 7, "text": "...", "payload": {...}} or {"id": "a1", "vector": [...]}',
        "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/collections/{name}/ingest", response_model=JobAccepted, status_code=202,
    summary="stream any number of points as NDJSON; processed by a background job",
    openapi_extra=_NDJSON_BODY,
)
async def ingest(request: Request, opened: CollectionDep, runtime: ReadyRuntime) -> JobAccepted:
    job, received = await runtime.job_runner().accept(opened, request)
    return JobAccepted(job_id=job.job_id, bytes_received=received)


@router.post(
    "/collections/{name}/ingest/files", response_model=JobAccepted, status_code=202,
    summary="load NDJSON or Parquet files from the server's --import-dir; processed by a background job",
    responses=documented(ErrorBody, {403: "a file outside --import-dir, or the server has no --import-dir"}),
)
async def ingest_files(body: FileIngest, opened: CollectionDep, runtime: ReadyRuntime) -> JobAccepted:
    job, size = await runtime.job_runner().accept_files(opened, body.paths)
    return JobAccepted(job_id=job.job_id, bytes_received=size)


@router.get("/jobs", response_model=JobList, summary="the newest ingestion jobs, newest first")
async def list_jobs(
    runtime: ReadyRuntime,
    state: Annotated[JobStateName | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    jobs = await run_in_threadpool(runtime.job_store().recent, state=state, limit=limit)
    active = runtime.ingestor.active if runtime.ingestor is not None else {}
    return JobList(jobs=[JobState.model_validate(active.get(j.job_id, j).to_dict()) for j in jobs])


@router.get("/jobs/{job_id}", response_model=JobState, summary="progress and bad lines of an ingestion job")
async def get_job(job_id: str, runtime: ReadyRuntime) -> JobState:
    active = runtime.ingestor.active if runtime.ingestor is not None else {}
    job = active.get(job_id) or await run_in_threadpool(runtime.job_store().get, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return JobState.model_validate(job.to_dict())
