"""NDJSON ingestion jobs: a body of any size, one point per line, committed chunk by chunk.

How a job runs (bounded memory whatever the body's size):
1. The request handler streams the body (`request.stream()`) to a spool file in
   ``data_dir/ingest/`` (one buffer of at most 1 MiB in RAM), fsyncs it, records the job, then
   answers 202 with the job id: from then on the job survives a crash or a restart.
2. A worker thread reads the spool file line by line (each line at most `max_line_bytes`),
   validates each point, gathers `ingest_chunk_points` of them, encodes their texts, and
   upserts the chunk (atomic). A bad line is recorded (`{"line", "message"}`, the first 100
   kept) and skipped; the job goes on. The job's state is saved in SQLite after each chunk.
3. Jobs run one at a time, in arrival order; the spool file is deleted when the job ends.
A job that a stop or a crash interrupted is resumed by the next process from its last saved
line (`recover`); upserts replace points by id, so re-reading a chunk is harmless.

Files under ``--import-dir`` (``accept_files``, ``service.files``) become such a spool file on a
single node (written whole before the job is recorded). Cluster mode passes a ``load_files``
that reads them with Ray Data instead (``service.cluster.bulk``); such a job is not resumed
after a restart: it fails, and running it again is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from index.errors import CollectionNotFound, InvalidInput, StorageFull
from service import files as input_files
from service.errors import CollectionUnavailable
from service.jobs import Job
from service.registry import OpenCollection
from service.schemas import PointIn, vector_array

if TYPE_CHECKING:
    from service.runtime import Runtime

logger = logging.getLogger(__name__)

_SPOOL_FLUSH = 2**20


class Ingestor:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.spool_dir = runtime.settings.data_dir / "ingest"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self._stop = threading.Event()
        self._running: set[asyncio.Future[None]] = set()
        self.active: dict[str, Job] = {}  # jobs accepted and not finished, by id (live progress)

    @property
    def stopping(self) -> bool:
        """A shutdown asked the running job to stop after its current chunk."""
        return self._stop.is_set()

    async def recover(self) -> None:
        """At start-up: resume the jobs a previous process accepted and did not finish, oldest
        first; fail those whose spool file or collection is gone; delete every other spool file."""
        store = self.runtime.job_store()
        await run_in_threadpool(self.spool_dir.mkdir, parents=True, exist_ok=True)
        resumed: set[Path] = set()
        for job in await run_in_threadpool(store.unfinished):
            path = self._spool_path(job.job_id)
            try:
                opened = self.runtime.registry.get(job.collection)
            except CollectionUnavailable:  # damaged on disk: wait, running, for a restore and restart
                logger.warning("ingestion job %s waits: collection %s is unavailable", job.job_id, job.collection)
                resumed.add(path)
                continue
            except CollectionNotFound:
                opened = None
            if opened is None or not path.is_file():
                job.state, job.finished_at = "failed", time.time()
                job.message = "interrupted, and its " + ("collection was dropped" if opened is None else "body is gone")
                await run_in_threadpool(store.save, job)
                continue
            # Bad lines past the resume point were recorded but not committed: they are read again.
            dropped = [e for e in job.errors if e["line"] > job.lines_read]
            job.errors = [e for e in job.errors if e["line"] <= job.lines_read]
            job.error_count -= len(dropped)
            job.message = f"resumed after a restart from line {job.lines_read + 1}"
            logger.info("ingestion job %s resumed from line %d", job.job_id, job.lines_read + 1)
            resumed.add(path)
            self._start(job, opened, path)
        for f in await run_in_threadpool(lambda: list(self.spool_dir.iterdir())):
            if f not in resumed:
                f.unlink()

    def _spool_path(self, job_id: str) -> Path:
        return self.spool_dir / f"{job_id}.ndjson"

    def _start(self, job: Job, opened: OpenCollection, path: Path,
               files: list[input_files.InputFile] | None = None) -> None:
        self.active[job.job_id] = job
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._run, job, opened, path, files)
        self._running.add(future)
        future.add_done_callback(self._running.discard)

    async def accept(self, opened: OpenCollection, request: Request) -> tuple[Job, int]:
        """Spool the request body, register the job, start it; returns (job, bytes received)."""
        self.runtime.job_store()  # 503 before start-up opened it
        job = Job(job_id=uuid.uuid4().hex, collection=opened.name)
        path = self._spool_path(job.job_id)
        received = 0
        f = await run_in_threadpool(open, path, "wb")
        try:
            buffer = bytearray()
            async for chunk in request.stream():
                buffer += chunk
                received += len(chunk)
                if len(buffer) >= _SPOOL_FLUSH:
                    await run_in_threadpool(f.write, bytes(buffer))
                    buffer.clear()
            if buffer:
                await run_in_threadpool(f.write, bytes(buffer))
            await run_in_threadpool(_sync_and_close, f, self.spool_dir)
        except BaseException:  # client went away mid-body, or the disk is full: no job
            f.close()
            path.unlink(missing_ok=True)
            raise
        await run_in_threadpool(self.runtime.job_store().save, job)
        self._start(job, opened, path)
        logger.info("ingestion job %s accepted: %d bytes for %s", job.job_id, received, opened.name)
        return job, received

    async def accept_files(self, opened: OpenCollection, names: list[str]) -> tuple[Job, int]:
        """A job over files under --import-dir; returns (job, bytes of the files)."""
        self.runtime.job_store()  # 503 before start-up opened it
        found = await run_in_threadpool(input_files.resolve, self.runtime.settings.import_dir, names)
        job = Job(job_id=uuid.uuid4().hex, collection=opened.name)
        size = sum(f.size for f in found)
        path = self._spool_path(job.job_id)
        if self.runtime.load_files is not None:  # cluster mode: Ray Data reads them
            job.message = "files: " + ", ".join(f.name for f in found)
            await run_in_threadpool(self.runtime.job_store().save, job)
            self._start(job, opened, path, files=found)
            return job, size
        partial = path.with_suffix(".partial")  # renamed once whole: a crash meanwhile leaves no job

        def spool() -> str:
            try:
                with open(partial, "wb") as f:
                    spans = input_files.write_ndjson(found, f)
                    _sync_and_close(f, self.spool_dir)
                partial.rename(path)
            finally:
                partial.unlink(missing_ok=True)
            return input_files.describe(spans)

        job.message = await run_in_threadpool(spool)
        await run_in_threadpool(self.runtime.job_store().save, job)
        self._start(job, opened, path)
        logger.info("ingestion job %s accepted: %s for %s", job.job_id, job.message, opened.name)
        return job, size

    async def stop(self) -> None:
        """Stop after the chunk being committed; unfinished jobs resume at the next start."""
        self._stop.set()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._pool.shutdown(wait=True)

    # -- the worker thread ----------------------------------------------------------------
    def _run(self, job: Job, opened: OpenCollection, path: Path,
             files: list[input_files.InputFile] | None = None) -> None:
        jobs = self.runtime.job_store()
        try:
            if job.started_at is None:
                job.started_at = time.time()
                jobs.save(job)
            if files is not None and self.runtime.load_files is not None:
                self.runtime.load_files(self, job, opened, files)
            else:
                with open(path, "rb") as f:
                    self._process(job, opened, f)
            if self._stop.is_set():  # stays running, with its spool file: the next start resumes it
                job.message = f"paused by a shutdown after line {job.lines_read}; resumes at the next start"
                jobs.save(job)
                self.active.pop(job.job_id, None)
                return
            job.state = "completed"
        except Exception as exc:
            logger.exception("ingestion job %s failed", job.job_id)
            job.state = "failed"
            why = str(exc) if isinstance(exc, StorageFull) else type(exc).__name__
            job.message = f"stopped after {job.lines_read} lines: {why}"
        job.finished_at = time.time()
        try:
            jobs.save(job)
        except Exception:  # a full disk, say: still "running" on disk, so the next start resumes it
            logger.exception("ingestion job %s: its end could not be recorded; the next start resumes it", job.job_id)
            self.active.pop(job.job_id, None)
            return
        self.active.pop(job.job_id, None)  # after the save: GET /jobs/{id} never goes back to running
        path.unlink(missing_ok=True)
        logger.info(
            "ingestion job %s %s: %d lines, %d points, %d bad lines, %.0f points/s",
            job.job_id, job.state, job.lines_read, job.points_committed, job.error_count, job.rate_per_s,
        )

    def _process(self, job: Job, opened: OpenCollection, f: BinaryIO) -> None:
        """Lines after ``job.lines_read`` (0, or where an interrupted run left off) to the end.

        ``job.lines_read`` is saved with each chunk as the last line accounted for (committed or
        recorded as bad), so that a resumed job neither skips nor double-counts a line.
        """
        settings = self.runtime.settings
        chunk: dict[Any, tuple[int, PointIn]] = {}  # id -> (line number, point)
        done = job.lines_read
        for number, line in _lines(f, settings.max_line_bytes):
            if number <= done:
                continue
            if self._stop.is_set():
                job.lines_read = done
                return
            job.lines_read = number  # live progress; set back to `done` before each save
            if line is None:
                self.fail(job, number, f"line longer than {settings.max_line_bytes} bytes (--max-line-bytes)")
            elif line.strip():
                try:
                    point = PointIn.model_validate_json(line)
                except ValidationError as exc:
                    self.fail(job, number, first_problem(exc))
                else:
                    if point.id in chunk:  # same id twice in a chunk: the later line wins, as if one by one
                        job.lines_read = done = number - 1
                        self.commit(job, opened, chunk)
                        job.lines_read = number
                    chunk[point.id] = (number, point)
                    if len(chunk) >= settings.ingest_chunk_points:
                        self.commit(job, opened, chunk)
            if not chunk:
                done = number
        if chunk and not self._stop.is_set():
            self.commit(job, opened, chunk)
        elif chunk:
            job.lines_read = done

    def commit(self, job: Job, opened: OpenCollection, chunk: dict[Any, tuple[int, PointIn]],
                encoded: dict[int, np.ndarray] | None = None) -> None:
        """Commit a chunk; ``encoded``: vectors of its texts already encoded, by line number."""
        entries = list(chunk.values())
        chunk.clear()
        config = opened.collection.config
        if config.multivector is not None:
            self._commit_sets(job, opened, entries)
            return
        vectors = np.zeros((len(entries), config.dim), dtype=np.float32)
        good = np.ones(len(entries), dtype=bool)
        text_rows: list[int] = []
        for i, (number, p) in enumerate(entries):
            if p.vectors is not None:
                good[i] = False
                self.fail(job, number, "'vectors' (a vector set) is for multi-vector collections; send 'vector'")
            elif p.text is not None:
                text_rows.append(i)
            elif p.vector is not None:
                try:
                    array = vector_array(p.vector)
                except InvalidInput as exc:
                    good[i] = False
                    self.fail(job, number, str(exc))
                    continue
                if array.shape != (config.dim,):
                    good[i] = False
                    self.fail(job, number, f"vector has {array.size} numbers, the collection's dim is {config.dim}")
                else:
                    vectors[i] = array
        if encoded:
            for i in [i for i in text_rows if entries[i][0] in encoded]:
                vectors[i] = encoded[entries[i][0]]
            text_rows = [i for i in text_rows if entries[i][0] not in encoded]
        if text_rows:
            try:
                encoder = self.runtime.encoder_of(opened)
            except Exception as exc:
                for i in text_rows:
                    good[i] = False
                    self.fail(job, entries[i][0], str(exc))
            else:
                vectors[text_rows] = encoder.encode([entries[i][1].text or "" for i in text_rows], batch_size=64)
        bad_rows = ~np.isfinite(vectors).all(axis=1)
        if config.metric == "cosine":
            bad_rows |= ~vectors.any(axis=1)
        for row in np.flatnonzero(good & bad_rows).tolist():
            good[row] = False
            self.fail(job, entries[row][0], "vector holds NaN or inf, or is all zeros under cosine")
        rows = np.flatnonzero(good)
        if not len(rows):
            self.runtime.job_store().save(job)
            return
        ids = [entries[i][1].id for i in rows]
        payloads = [entries[i][1].payload for i in rows]
        texts = [entries[i][1].text for i in rows]  # kept with the points (and the sparse stage's)
        try:
            opened.collection.upsert(ids, vectors[rows], payloads, texts)
            committed = len(rows)
        except InvalidInput:
            committed = 0  # find the culprits: one point at a time
            for row in rows.tolist():
                number, p = entries[row]
                try:
                    opened.collection.upsert([p.id], vectors[row : row + 1], [p.payload], [p.text])
                    committed += 1
                except InvalidInput as exc:
                    self.fail(job, number, str(exc))
        job.points_committed += committed
        metrics = self.runtime.metrics
        metrics.ingested_points.inc(committed)
        metrics.set_points(opened.name, opened.collection.count())
        self.runtime.job_store().save(job)

    def _commit_sets(self, job: Job, opened: OpenCollection, entries: list[tuple[int, PointIn]]) -> None:
        """A chunk of a multi-vector collection: each point a vector set, or text turned into one."""
        from service.runtime import text_vector_sets

        sets: list[Any] = []
        kept: list[tuple[int, PointIn]] = []
        texts: list[int] = []
        for number, p in entries:
            if p.vector is not None:
                self.fail(job, number, "multi-vector collection: send 'vectors' (a set) or 'text', not 'vector'")
                continue
            if p.text is not None:
                texts.append(len(kept))
            kept.append((number, p))
            sets.append(p.vectors)
        if texts:
            try:
                encoder = self.runtime.encoder_of(opened)
            except Exception as exc:
                for i in texts:
                    self.fail(job, kept[i][0], str(exc))
                    sets[i] = None
            else:
                encoded = text_vector_sets(encoder, [kept[i][1].text or "" for i in texts])
                for i, one in zip(texts, encoded, strict=True):
                    sets[i] = one
        pairs = [(k, s) for k, s in zip(kept, sets, strict=True) if s is not None]
        committed = 0
        if pairs:
            try:
                committed = opened.collection.upsert(
                    [k[1].id for k, _ in pairs], [s for _, s in pairs], [k[1].payload for k, _ in pairs]
                )
            except InvalidInput:
                for (number, p), one in pairs:  # find the culprits: one point at a time
                    try:
                        committed += opened.collection.upsert([p.id], [one], [p.payload])
                    except InvalidInput as exc:
                        self.fail(job, number, str(exc))
        job.points_committed += committed
        self.runtime.metrics.ingested_points.inc(committed)
        self.runtime.metrics.set_points(opened.name, opened.collection.count())
        self.runtime.job_store().save(job)

    def fail(self, job: Job, number: int, message: str) -> None:
        job.add_error(number, message)
        self.runtime.metrics.ingest_failed_lines.inc()


def _sync_and_close(f: BinaryIO, directory: Path) -> None:
    """Make a just-written spool file durable (its data and its directory entry), then close it."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(f: BinaryIO, limit: int) -> Any:
    """(1-based number, line bytes) per line; None for a line over `limit` bytes (skipped)."""
    number = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of the long line
                line = f.readline(2**20)
            yield number, None
            continue
        yield number, line


def first_problem(exc: ValidationError) -> str:
    problems = exc.errors()
    if not problems:
        return "invalid point"
    p = problems[0]
    if p.get("type") == "json_invalid":
        return "not valid JSON"
    loc = ".".join(str(x) for x in p.get("loc", ()))
    msg = str(p.get("msg", "invalid"))
    return f"{loc}: {msg}" if loc else msg


__all__ = ["Ingestor", "first_problem"]
