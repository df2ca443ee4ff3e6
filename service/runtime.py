"""What a running server holds: open collections, the encoder and its micro-batcher, jobs, metrics.

`Runtime.start()` runs as a background task of the app's lifespan, so that `/livez` answers at
once and `/readyz` says 503 until the collections are open and the encoder answered a probe.
Every CPU-bound call (encoding, faiss, disk reads and writes) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from starlette.concurrency import run_in_threadpool
from threadpoolctl import threadpool_limits

from index import RecallMonitor, SearchResult
from index import device as faiss_device
from index.errors import DimensionMismatch, InvalidArgument
from service import schemas
from service.batcher import MicroBatcher, Overloaded
from service.encoder import TextEncoder
from service.errors import BatchTooLarge, EncoderUnavailable, NotReady, Unprocessable
from service.ingest import Ingestor
from service.jobs import JobStore
from service.metrics import Metrics
from service.registry import CollectionRegistry, OpenCollection
from service.settings import Settings

logger = logging.getLogger(__name__)

PROBE_TEXT = "tandem readiness probe"
CUDA = "CUDAExecutionProvider"
#: onnxruntime providers per --device; auto (None) lets the encoder take CUDA when onnxruntime offers it.
ENCODER_PROVIDERS: dict[str, list[str] | None] = {
    "auto": None, "cpu": ["CPUExecutionProvider"], "gpu": [CUDA, "CPUExecutionProvider"],
}


class Runtime:
    def __init__(self, settings: Settings, metrics: Metrics, *, registry: Any = None,
                 load_encoder: Callable[[Path], TextEncoder] | None = None,
                 load_files: Callable[..., None] | None = None) -> None:
        self.settings = settings
        #: Builds the encoder from ``settings.model_dir`` (when set): by default onnxruntime in this
        #: process; cluster mode passes one that answers from its encoder deployment.
        self.load_encoder = load_encoder or self._load_local_encoder
        #: Runs a file ingestion job (ingestor, job, collection, files) in the job's thread; by
        #: default (None) the files become the job's NDJSON spool file.
        self.load_files = load_files
        self.metrics = metrics
        self.registry: CollectionRegistry = registry if registry is not None else CollectionRegistry(settings.data_dir)
        self.encoders: dict[str, TextEncoder] = {}
        self.started_at = time.time()
        self.batcher: MicroBatcher[str, np.ndarray] | None = None
        self.jobs: JobStore | None = None
        self.ingestor: Ingestor | None = None
        self.ready = False
        self.stopping = False
        self.startup_error: str | None = None
        cpus = os.cpu_count() or 1
        # faiss runs one thread per search by design; as many searches as cores run at once.
        self._search_pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="search")
        # Bulk encoding (batch searches, text upserts, ingestion) shares one thread: the
        # micro-batcher has its own, and two concurrent encoder calls already fill two cores.
        self._bulk_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-encode")
        self._searches_waiting = 0
        self._background: set[asyncio.Task[Any]] = set()
        self.recall = RecallMonitor(
            settings.recall_sample_rate, per_minute=settings.recall_samples_per_minute,
            cpu_share=settings.recall_cpu_share, on_sample=self._recall_sampled,
            on_drop=lambda name: metrics.recall_dropped.labels(name).inc(),
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            t0 = time.perf_counter()
            # numpy's BLAS (exact scans, the recall monitor's repeats) on one thread per call, as
            # faiss: concurrency comes from concurrent requests. A single exact scan of 117k
            # glosses took 10 ms on two BLAS threads and 17 on one, but the two threads spun
            # both cores for it (and the recall monitor, which budgets its own thread's CPU
            # time, moved the served p99 by +37% until this; benchmarks/recall_bench.py).
            threadpool_limits(limits=1, user_api="blas")
            # Before the collections open: their coarse stages are built on the chosen device.
            coarse_device = faiss_device.select(self.settings.device)
            faiss_device.use(coarse_device)
            names = await run_in_threadpool(self.registry.open_all)
            for name in names:
                collection = self.registry.get(name).collection
                self.metrics.set_points(name, collection.count())
                self.metrics.set_recall_target(name, collection.config.target_recall)
            self.jobs = await run_in_threadpool(JobStore.open, self.settings.data_dir / "jobs.sqlite")
            self.ingestor = Ingestor(self)
            if self.settings.model_dir is not None:
                encoder = await run_in_threadpool(self.load_encoder, self.settings.model_dir)
                probe = await run_in_threadpool(encoder.encode, [PROBE_TEXT])
                if probe.shape != (1, encoder.dim) or not np.isfinite(probe).all():
                    raise RuntimeError(f"encoder {encoder.name} answered the probe with {probe.shape}")
                self.encoders[encoder.name] = encoder
                self.batcher = MicroBatcher(
                    self._encode_queries,
                    max_batch=self.settings.encode_batch_size,
                    max_wait_ms=self.settings.batch_wait_ms,
                    max_queue=self.settings.search_queue_size,
                    max_delay_ms=self.settings.max_queue_delay_ms,
                    name="query-encoder",
                )
            logger.info(
                "device %s: %s; coarse stage on %s (%s)", self.settings.device,
                _encoder_device(self.settings.device, next(iter(self.encoders.values()), None)),
                coarse_device.device, coarse_device.reason,
            )
            await self.ingestor.recover()  # after the encoder: resumed jobs may hold text
            self.metrics.watch_queue(self.queue_depth)
            self.ready = True
            self.metrics.ready.set(1)
            logger.info(
                "ready in %.2f s: %d collections, encoders %s",
                time.perf_counter() - t0, len(names), sorted(self.encoders),
            )
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            logger.exception("start-up failed; /readyz stays 503 until this is fixed and the server restarted")

    def _load_local_encoder(self, model_dir: Path) -> TextEncoder:
        return TextEncoder.load(model_dir, threads=self.settings.encoder_threads,
                                quantized=self.settings.encoder_int8, providers=ENCODER_PROVIDERS[self.settings.device])

    async def stop(self) -> None:
        self.ready = False
        self.stopping = True
        self.metrics.ready.set(0)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.ingestor is not None:
            await self.ingestor.stop()
        if self.batcher is not None:
            await self.batcher.close()
        self._search_pool.shutdown(wait=True)
        self._bulk_pool.shutdown(wait=True)
        await run_in_threadpool(self.recall.close)
        await run_in_threadpool(self.registry.close_all)
        if self.jobs is not None:
            self.jobs.close()
        logger.info("stopped")

    def require_ready(self) -> None:
        if not self.ready:
            if self.startup_error:
                raise NotReady(f"start-up failed: {self.startup_error}")
            raise NotReady("shutting down" if self.stopping else "starting: collections or encoder still loading")

    def job_store(self) -> JobStore:
        """The ingestion jobs' store; 503 until start-up has opened it."""
        if self.jobs is None:
            raise NotReady("starting: the job store is not open yet")
        return self.jobs

    def job_runner(self) -> Ingestor:
        if self.ingestor is None:
            raise NotReady("starting: ingestion is not available yet")
        return self.ingestor

    def spawn(self, work: Coroutine[Any, Any, Any], *, what: str) -> None:
        """Run `work` after the response (wait=false); failures are logged, shutdown waits for it."""

        async def logged() -> None:
            try:
                await work
            except Exception:
                logger.exception("background %s failed", what)

        task = asyncio.get_running_loop().create_task(logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def queue_depth(self) -> float:
        return (self.batcher.queue_depth if self.batcher is not None else 0) + self._searches_waiting

    # -- encoders ---------------------------------------------------------------------------
    def check_encoder(self, name: str | None, dim: int | None) -> int:
        """The dim of a new collection using encoder `name` (None: vectors only)."""
        if name is None:
            if dim is None:
                raise Unprocessable("give 'dim' (or an 'encoder' whose dimension is used)")
            return dim
        encoder = self.encoders.get(name)
        if encoder is None:
            loaded = ", ".join(sorted(self.encoders)) or "none (started with --encoder '')"
            raise Unprocessable(f"encoder {name!r} is not loaded by this server; loaded: {loaded}")
        if dim is not None and dim != encoder.dim:
            raise Unprocessable(f"dim {dim} differs from encoder {name!r}'s dimension {encoder.dim}: omit 'dim'")
        return encoder.dim

    def encoder_of(self, opened: OpenCollection) -> TextEncoder:
        if opened.encoder is None:
            raise Unprocessable(
                f"collection {opened.name!r} has no encoder: send 'vector' instead of 'text', "
                "or create a collection with an 'encoder'"
            )
        encoder = self.encoders.get(opened.encoder)
        if encoder is None:
            raise EncoderUnavailable(f"encoder {opened.encoder!r} of collection {opened.name!r} is not loaded")
        return encoder

    def _encode_queries(self, texts: list[str]) -> list[np.ndarray]:
        encoder = next(iter(self.encoders.values()))
        self.metrics.encode_batch.observe(len(texts))
        return list(encoder.encode(texts, batch_size=len(texts)))

    async def encode_query(self, opened: OpenCollection, text: str) -> np.ndarray:
        encoder = self.encoder_of(opened)
        if self.batcher is None or encoder is not next(iter(self.encoders.values())):
            vectors = await self.encode_bulk(encoder, [text])
            return np.asarray(vectors[0])
        return await self.batcher.submit(text)

    async def encode_bulk(self, encoder: TextEncoder, texts: Sequence[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._bulk_pool, lambda: encoder.encode(texts, batch_size=64))

    # -- search -----------------------------------------------------------------------------
    async def _search(self, opened: OpenCollection, queries: Any, req: schemas.SearchRequest,
                      texts: list[str] | None = None) -> SearchResult:
        if self._searches_waiting >= self.settings.search_queue_size:
            raise Overloaded(f"{self._searches_waiting} searches already waiting; retry later")
        self._searches_waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._search_pool,
                lambda: opened.guarded(
                    opened.collection.search_detailed, queries, req.k, oversampling=req.oversampling,
                    filter=req.filter, exact=req.exact, with_payload=req.with_payload, text=texts,
                    mode=req.mode, fusion=req.fusion, nprobe=req.nprobe, target_recall=req.target_recall,
                ),
            )
        finally:
            self._searches_waiting -= 1

    def _sample_recall(self, opened: OpenCollection, queries: Any, req: schemas.SearchRequest,
                       result: SearchResult) -> None:
        """Offer an approximate dense search to the recall monitor (which samples a share of them)."""
        setting = result.setting
        if self.recall.rate > 0 and setting is not None and not setting.exact and queries is not None:
            served = [[hit.score for hit in hits] for hits in result.hits]
            self.recall.offer(opened.name, opened.collection, queries, req.k, req.filter, served, setting)

    def _recall_sampled(self, name: str, recall: float) -> None:
        self.metrics.observe_recall(name, recall, self.recall.estimate(name).estimate)

    async def search(self, opened: OpenCollection, req: schemas.SearchRequest) -> schemas.SearchResponse:
        t0 = time.perf_counter()
        encode_s = None
        if opened.collection.config.multivector is not None:
            queries: Any = [await self._query_set(opened, req, "")]
            encode_s = time.perf_counter() - t0 if req.text is not None else None
        elif search_mode(opened, req, None) == "sparse":
            queries = None  # BM25 alone: nothing to encode
        elif req.text is not None:
            queries = (await self.encode_query(opened, req.text))[None, :]
            encode_s = time.perf_counter() - t0
        else:
            queries = _vector(req.vector, opened, "vector")[None, :]
        result = await self._search(opened, queries, req, None if req.text is None else [req.text])
        self.metrics.observe_stages(encode_s, result.coarse_s, result.rerank_s, result.candidates)
        self._sample_recall(opened, queries, req, result)
        return _response(result, 0, t0, encode_s or 0.0, 1)

    async def search_batch(
        self, opened: OpenCollection, reqs: list[schemas.SearchRequest]
    ) -> list[schemas.SearchResponse]:
        if len(reqs) > self.settings.max_batch_searches:
            raise BatchTooLarge(
                f"{len(reqs)} searches in one batch; the limit is {self.settings.max_batch_searches} "
                "(--max-batch-searches): split the batch"
            )
        t0 = time.perf_counter()
        if opened.collection.config.multivector is not None:
            return [await self.search(opened, r) for r in reqs]
        queries = np.empty((len(reqs), opened.collection.config.dim), dtype=np.float32)
        modes = [search_mode(opened, r, i) for i, r in enumerate(reqs)]
        text_rows = [i for i, r in enumerate(reqs) if r.text is not None and modes[i] != "sparse"]
        for i, r in enumerate(reqs):
            if r.vectors is not None:
                raise Unprocessable(
                    f"searches[{i}]: 'vectors' (a query vector set) is for multi-vector collections; send 'vector'"
                )
        for i, r in enumerate(reqs):
            if r.vector is not None:
                queries[i] = _vector(r.vector, opened, f"searches[{i}].vector")
        encode_s = 0.0
        if text_rows:
            encoder = self.encoder_of(opened)
            queries[text_rows] = await self.encode_bulk(encoder, [reqs[i].text or "" for i in text_rows])
            encode_s = time.perf_counter() - t0
        # One library call per distinct set of parameters: the coarse stage and the disk reads
        # are shared by all queries of a group.
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            # (searches with and without a text apart: a text makes the default mode hybrid)
            key = json.dumps([r.k, r.oversampling, r.exact, r.filter, r.with_payload, modes[i], r.fusion,
                              r.text is None, r.nprobe, r.target_recall], sort_keys=True)
            groups.setdefault(key, []).append(i)
        out: list[schemas.SearchResponse | None] = [None] * len(reqs)
        for rows in groups.values():
            texts = [reqs[i].text for i in rows]
            group = None if modes[rows[0]] == "sparse" else queries[rows]
            result = await self._search(opened, group, reqs[rows[0]],
                                        None if None in texts else [t or "" for t in texts])
            self._sample_recall(opened, group, reqs[rows[0]], result)
            n = len(rows)
            for j, i in enumerate(rows):
                self.metrics.observe_stages(
                    encode_s / len(reqs) if reqs[i].text is not None else None,
                    result.coarse_s / n, result.rerank_s / n, result.candidates,
                )
                out[i] = _response(result, j, t0, encode_s / len(reqs), n)
        return [r for r in out if r is not None]

    # -- writes -----------------------------------------------------------------------------
    async def upsert(self, opened: OpenCollection, points: list[schemas.PointIn]) -> int:
        limit = self.settings.max_batch_points
        if len(points) > limit:
            raise BatchTooLarge(
                f"{len(points)} points in one request; the limit is {limit} (--max-batch-points): "
                "split the batch, or stream it to POST /collections/{name}/ingest"
            )
        ids, vectors, payloads = await self.prepare_points(opened, points)
        texts = None if opened.collection.config.multivector is not None else [p.text for p in points]
        n = await run_in_threadpool(opened.guarded, opened.collection.upsert, ids, vectors, payloads, texts)
        self.metrics.upserted_points.inc(n)
        self.metrics.set_points(opened.name, opened.collection.count())
        return n

    async def prepare_points(
        self, opened: OpenCollection, points: list[schemas.PointIn]
    ) -> tuple[list[Any], Any, list[dict[str, Any] | None]]:
        """ids, vectors (texts encoded), payloads. Vectors: ``(n, dim) float32``, or for a
        multi-vector collection a list of n ``(m_i, dim)`` sets (the library validates them)."""
        if opened.collection.config.multivector is not None:
            return [p.id for p in points], await self._point_sets(opened, points), [p.payload for p in points]
        for i, p in enumerate(points):
            if p.vectors is not None:
                raise Unprocessable(
                    f"points[{i}]: 'vectors' (a vector set) is for multi-vector collections; "
                    f"collection {opened.name!r} takes one 'vector' per point"
                )
        dim = opened.collection.config.dim
        vectors = np.empty((len(points), dim), dtype=np.float32)
        text_rows: list[int] = []
        for i, p in enumerate(points):
            if p.vector is not None:
                vectors[i] = _vector(p.vector, opened, f"points[{i}].vector")
            else:
                text_rows.append(i)
        if text_rows:
            encoder = self.encoder_of(opened)
            vectors[text_rows] = await self.encode_bulk(encoder, [points[i].text or "" for i in text_rows])
        return [p.id for p in points], vectors, [p.payload for p in points]

    async def _point_sets(self, opened: OpenCollection, points: list[schemas.PointIn]) -> list[Any]:
        sets: list[Any] = [None] * len(points)
        text_rows: list[int] = []
        for i, p in enumerate(points):
            if p.vector is not None:
                raise Unprocessable(
                    f"points[{i}]: collection {opened.name!r} is multi-vector: send 'vectors' (a set) or 'text'"
                )
            if p.vectors is not None:
                sets[i] = p.vectors
            else:
                text_rows.append(i)
        if text_rows:
            encoder = self.encoder_of(opened)
            texts = [points[i].text or "" for i in text_rows]
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self._bulk_pool, lambda: text_vector_sets(encoder, texts))
            for i, one in zip(text_rows, encoded, strict=True):
                sets[i] = one
        return sets

    async def _query_set(self, opened: OpenCollection, req: schemas.SearchRequest, where: str) -> Any:
        if req.vector is not None:
            raise Unprocessable(
                f"{where}collection {opened.name!r} is multi-vector: search with 'vectors' (a set) or 'text'"
            )
        if req.vectors is not None:
            return req.vectors
        encoder = self.encoder_of(opened)
        loop = asyncio.get_running_loop()
        text = req.text or ""
        return (await loop.run_in_executor(self._bulk_pool, lambda: text_vector_sets(encoder, [text])))[0]

    async def delete(self, opened: OpenCollection, ids: list[Any]) -> int:
        n = await run_in_threadpool(opened.guarded, opened.collection.delete, ids)
        self.metrics.set_points(opened.name, opened.collection.count())
        return n


def _encoder_device(requested: str, encoder: TextEncoder | None) -> str:
    """Where the encoder runs and why, for the start-up log; raises when --device gpu got no GPU."""
    if encoder is None:
        return "no encoder"
    if encoder.provider == CUDA:
        return f"encoder on {CUDA}"
    if requested == "cpu":
        why = "the CPU was asked for"
    elif CUDA not in ort.get_available_providers():
        why = "onnxruntime-gpu is not installed"
    else:
        why = "onnxruntime's CUDA provider did not start; see its log above"
    if requested == "gpu":
        raise RuntimeError(
            f"--device gpu, but the encoder cannot run on a GPU: {why}; "
            "set TANDEM_DEVICE=auto (--device auto) to fall back to the CPU"
        )
    return f"encoder on {encoder.provider} ({why})"


def text_vector_sets(encoder: TextEncoder, texts: Sequence[str]) -> list[np.ndarray]:
    """The vector set of each text in a multi-vector collection: its token embeddings.

    Token-level (ColBERT-style) sets, chosen by measurement on SciFact
    (benchmarks/multivector_bench.py, README "Multi-vector"); each token vector L2-normalised.
    """
    return encoder.encode_tokens(list(texts))


def _vector(values: schemas.Vector | None, opened: OpenCollection, where: str) -> np.ndarray:
    dim = opened.collection.config.dim
    array = schemas.vector_array(values if values is not None else [])
    if array.shape != (dim,):
        raise DimensionMismatch(
            f"{where} has {array.size} numbers, but collection {opened.name!r} has dim {dim}"
        )
    return array


def _response(result: SearchResult, j: int, t0: float, encode_s: float, n: int) -> schemas.SearchResponse:
    """The answer to query ``j`` of ``result`` (one of ``n`` that shared the library call)."""
    setting = result.setting
    return schemas.SearchResponse(
        filter_indexed=result.filter_indexed,
        mode=result.mode,
        setting=None if setting is None else schemas.SearchSetting(
            exact=setting.exact, oversampling=setting.oversampling, nprobe=setting.nprobe,
            target_recall=setting.target_recall, expected_recall=setting.expected_recall,
        ),
        hits=[schemas.Hit(id=h.id, score=h.score, payload=h.payload) for h in result.hits[j]],
        took_ms=(time.perf_counter() - t0) * 1000,
        stages_ms=schemas.StagesMs(encode=encode_s * 1000, coarse=result.coarse_s * 1000 / n,
                                   sparse=result.sparse_s * 1000 / n, rerank=result.rerank_s * 1000 / n),
    )


def search_mode(opened: OpenCollection, req: schemas.SearchRequest, i: int | None) -> str:
    """The mode a search runs in, as the library decides it (a text is encoded, so a query always
    has a vector but in sparse mode), and a 422 for what cannot be served: before anything is encoded."""
    try:
        return opened.collection.search_mode(req.mode, vector=True, text=req.text is not None)
    except InvalidArgument as exc:
        raise Unprocessable(f"{'' if i is None else f'searches[{i}]: '}{exc}") from None
