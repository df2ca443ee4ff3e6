"""A collection: the catalog (SQLite), the dense vectors on disk, and the coarse stage in RAM.

Write protocol (one ``upsert`` is atomic and durable once it returns):
1. validate everything; nothing is written for bad input;
2. append the vectors after the committed rows of the dense file, fsync;
3. one SQLite transaction: insert ids and payloads, tombstone replaced ids, bump ``n_rows``;
   its commit is the commit point;
4. update the in-RAM coarse stage.
A crash before 3 leaves extra rows past ``n_rows`` that ``open`` cuts off; a crash after 3 is
caught up at ``open`` by re-encoding the rows the last coarse checkpoint lacks.

The coarse stage is rebuilt (re-clustered, re-centred) off the write path: a background thread
builds a new one from the vectors on disk while searches and writes go on, then it is caught up
and swapped in under the write lock (``_rebuild_and_swap``). Checkpoints are captured in memory
under the lock and written to disk after it is released.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pyroaring import BitMap

from index import coarse as coarse_mod
from index.batch import (
    PointBatch,
    PointId,
    VectorSetBatch,
    check_id,
    check_ids,
    check_k,
    check_oversampling,
    check_texts,
    check_vector_sets,
    check_vectors,
)
from index.catalog import Catalog
from index.coarse import CoarseStage
from index.coarse.lists import widened
from index.coarse.sparse import SparseStage
from index.config import CollectionConfig, Fusion, SearchMode
from index.dense_store import DenseStore
from index.errors import (
    CollectionExists,
    CollectionNotFound,
    CorruptIndex,
    InvalidArgument,
    is_storage_full,
    storage_full,
)
from index.fde import FDEEncoder, MuveraParams
from index.filters import KEY, Filter, Need
from index.locks import ReadWriteLock
from index.payload_index import FieldIndex, PayloadIndexes, PayloadType
from index.rebuild import BackgroundRebuild, Cancelled, release_free_memory
from index.recall import OVERSAMPLINGS, Applied, Calibration, Choice, Setting, Tally, probe_grid, query_recall
from index.row_sets import Allowed, bitmap, rows_of
from index.vector_sets import VectorSetStore

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CATALOG = "catalog.sqlite"
#: Save the coarse stage once this many rows were added since the last save, so that ``open``
#: never has to re-encode more than this many rows from disk.
CHECKPOINT_ROWS = 262_144
#: Space held back in each collection for SQLite to open its catalog on an otherwise full disk.
RESERVE = "reserve.bin"
RESERVE_BYTES = 128 * 1024
#: A multi-vector collection of at most this many points is scanned exactly (see search_detailed).
MULTIVECTOR_EXACT_POINTS = 3_000
#: A filter is answered exactly, its rows read from disk, while they number at most the rows
#: reranked plus the codes the coarse stage would scan divided by this: on the glosses a row
#: gathered from the page cache and scored cost 0.5-1.6 us, a code scanned by FastScan ~3.5 ns.
EXACT_COST_RATIO = 256
#: An exact search over at most this many given rows reads them in one gather; over more, it
#: scans the whole file in blocks with a mask.
EXACT_GATHER_ROWS = 65_536
#: Target-recall calibration: the collection's own points searched as queries, and the k of the
#: recall it measures (a search's default k). 500 queries bound a recall of 0.99 within about
#: +-0.004 when the misses spread over the queries (see index.recall).
CALIBRATION_QUERIES = 500
CALIBRATION_K = 10
CALIBRATION_META = "recall_calibration"
#: Calibration queries searched under one hold of the read lock.
CALIBRATION_BLOCK = 50
#: Monitor samples added to the calibration between two writes of it to the catalog.
CALIBRATION_SAVE_EVERY = 64
#: A background rebuild catches up with rows written meanwhile outside the write lock until at
#: most this many are left, which it adds under the lock just before the swap.
SWAP_CATCH_UP_ROWS = 4_096


class Hit(NamedTuple):
    id: PointId
    score: float
    payload: dict[str, Any] | None


class Point(NamedTuple):
    id: PointId
    vector: np.ndarray
    payload: dict[str, Any] | None
    text: str | None = None  # the text it was made from, if it was


class SearchResult(NamedTuple):
    hits: list[list[Hit]]
    coarse_s: float
    rerank_s: float
    candidates: int  # rows reranked exactly, per query
    filter_indexed: bool | None = None  # None: no filter; False: a key without a payload index
    sparse_s: float = 0.0  # in the sparse (BM25) stage
    mode: SearchMode = "dense"
    setting: Applied | None = None  # dense mode: how the search ran (see index.recall)


class CollectionStats(NamedTuple):
    points: int
    ram_bytes: int
    disk_bytes: int


class Collection:
    """Open with ``Collection.create`` or ``Collection.open``; thread-safe; close when done."""

    def __init__(self, path: Path, catalog: Catalog, config: CollectionConfig) -> None:
        self.path = path
        self.config = config
        self._catalog = catalog
        self._lock = ReadWriteLock()
        self._writer = threading.Lock()  # one writer at a time; taken before self._lock, never after
        self._generation = int(catalog.get_meta("generation") or 0)
        n_rows = catalog.n_rows
        catalog.check(n_rows)
        mv = config.multivector
        # Multi-vector points: the dense store holds each point's FDE (its single-vector proxy),
        # the vector-set store all their vectors, for the exact Chamfer rerank.
        self._fde = (
            FDEEncoder(config.dim, params=MuveraParams(k_sim=mv.k_sim, d_proj=mv.d_proj, r_reps=mv.r_reps,
                                                       seed=mv.seed, d_final=mv.d_final))
            if mv is not None
            else None
        )
        stored_dim = self._fde.fde_dim if self._fde is not None else config.dim
        self._dense = DenseStore(
            self._vectors_path(self._generation), dim=stored_dim, dtype=config.dtype, n_rows=n_rows
        )
        self._sets: VectorSetStore | None = None
        self._max_vectors = mv.max_vectors if mv is not None else 0
        if self._fde is not None:
            sizes = catalog.set_sizes()
            if len(sizes) != n_rows:
                raise CorruptIndex(f"catalog of {path} lists {len(sizes)} points but commits {n_rows} rows")
            self._sets = VectorSetStore(
                self._tokens_path(self._generation), dim=config.dim, dtype=config.dtype,
                sizes=sizes, n_vectors=int(catalog.get_meta("n_tokens") or 0),
            )
        # Live rows, in a buffer that grows by a fraction of its size: O(1) amortised per row.
        self._live_buf = np.ones(n_rows, dtype=bool)
        self._live_buf[catalog.dead_rows()] = False
        self._n_rows = n_rows
        self._n_dead = int(n_rows - self._live_buf.sum())
        self._live_rows = bitmap(np.flatnonzero(self._live))  # the same, as a roaring bitmap
        self._payload = PayloadIndexes(json.loads(catalog.get_meta("payload_indexes") or "{}"))
        self._payload.rebuild(catalog.payloads(live_only=True))
        self._remove_stale_files()
        _keep_reserve(path)
        self._coarse: CoarseStage | None = coarse_mod.make_coarse(config, stored_dim)
        self._saved_rows = 0
        self._checkpoint_lock = threading.Lock()  # one checkpoint written at a time
        self._closed = False
        self.rebuilds = BackgroundRebuild(str(path))
        self._load_coarse()
        self._sparse: SparseStage | None = None
        # True when the sparse stage may lack committed rows (a crash, or a write it failed):
        # the next write, or this open, indexes them from the catalog.
        self._sparse_behind = True
        if config.has_sparse:
            self._sparse = SparseStage(self._sparse_path(self._generation))
            self._sparse_write(self._n_rows, [], ())
        self._calibration = _load_calibration(catalog.get_meta(CALIBRATION_META), path)
        self._calibration_saved = 0  # monitor samples added since it was last stored
        self._calibrating = threading.Lock()  # one calibration at a time
        self._recalibration_lock = threading.Lock()
        self._recalibration: threading.Thread | None = None
        self._closing = False

    @property
    def _live(self) -> np.ndarray:
        """``(rows,) bool``: True where the row is a live point (a view of the buffer)."""
        return self._live_buf[: self._n_rows]

    def _append_live(self, n: int) -> None:
        need = self._n_rows + n
        if need > len(self._live_buf):
            grown = np.ones(max(need, len(self._live_buf) * 9 // 8, 1024), dtype=bool)
            grown[: self._n_rows] = self._live
            self._live_buf = grown
        self._live_buf[self._n_rows : need] = True
        self._live_rows.add_range(self._n_rows, need)
        self._n_rows = need

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: CollectionConfig) -> Collection:
        """Create an empty collection in a new directory ``path`` (atomically: all or nothing)."""
        path = Path(path)
        if (path / CATALOG).exists() or (path.exists() and any(path.iterdir())):
            raise CollectionExists(f"{path} already exists: open it, or pick another path")
        staging = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        catalog = Catalog(staging / CATALOG)
        catalog.set_meta(
            {"config": config.model_dump_json(), "format": FORMAT_VERSION, "generation": "0", "n_rows": "0"}
        )
        catalog.close()
        if path.exists():
            path.rmdir()
        staging.rename(path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Collection:
        path = Path(path)
        if not (path / CATALOG).is_file():
            raise CollectionNotFound(f"no collection at {path}: create it first")
        try:
            try:
                catalog = Catalog(path / CATALOG)
            except sqlite3.OperationalError:
                # SQLite needs a little space to open (its WAL index): on a full disk, give it
                # the collection's reserve and try once more.
                if not _release_reserve(path):
                    raise
                catalog = Catalog(path / CATALOG)
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise  # locked, unreadable, a full disk: not a damaged collection
            raise CorruptIndex(
                f"{path / CATALOG} is not a readable SQLite database ({exc}): restore the collection from a backup"
            ) from None
        try:
            raw = catalog.get_meta("config")
            if raw is None:
                raise CorruptIndex(f"{path / CATALOG} has no config: it is not a tandem collection")
            try:
                config = CollectionConfig.model_validate_json(raw)
            except ValueError as exc:
                raise CorruptIndex(f"{path / CATALOG} holds an unreadable config: {exc}") from None
            return cls(path, catalog, config)
        except BaseException:
            catalog.close()
            raise

    def close(self, *, checkpoint: bool = True) -> None:
        """Save the coarse stage (unless ``checkpoint=False``: it is about to be deleted) and close.
        A rebuild still running is cancelled (the next open starts it again)."""
        self.rebuilds.stop()
        with self._recalibration_lock:
            self._closing = True  # a calibration running stops at its next step; none starts
            running = self._recalibration
        if running is not None:
            running.join()
        self._save_calibration()
        with self._writer, self._lock.write():
            # An untrained stage holds nothing but a row count, which open recounts: not written.
            if checkpoint and self._coarse is not None and self._coarse.ready and self._coarse.rows != self._saved_rows:
                self._write_checkpoint(self._coarse.checkpoint(), self._coarse.rows, self._generation)
            with self._checkpoint_lock:  # waits for a checkpoint being written after a write
                self._closed = True
            if self._sparse is not None:
                self._sparse.close()
            self._dense.close()
            if self._sets is not None:
                self._sets.close()
            self._catalog.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------
    def upsert(
        self, ids: Sequence[PointId], vectors: Any, payloads: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
    ) -> int:
        """Insert or replace points. All or nothing. Returns how many.

        ``vectors``: ``(n, dim)``; in a multi-vector collection, a list of n ``(m_i, dim)`` sets.
        ``texts``: the text each point was made from (None for a point given as a vector only):
        kept with the point, and indexed by the sparse stage if the collection has one.
        """
        if self._fde is None:
            batch = PointBatch.build(ids, vectors, payloads, dim=self.config.dim, normalize=self._normalize)
            self._write(batch.ids, batch.vectors, batch.payloads, texts=check_texts(texts, len(batch.ids)))
            return len(batch.ids)
        if texts is not None and any(t is not None for t in texts):
            raise InvalidArgument("multi-vector points do not keep a text: pass texts=None")
        sets = VectorSetBatch.build(
            ids, vectors, payloads, dim=self.config.dim, normalize=self._normalize, max_vectors=self._max_vectors
        )
        self._write(sets.ids, self._fde.encode_documents(sets.sets()), sets.payloads, sets)
        return len(sets.ids)

    def _write(
        self, keys: list[PointId], vectors: np.ndarray, payloads: list[str | None], sets: VectorSetBatch | None = None,
        *, texts: list[str | None] | None = None,
    ) -> None:
        checkpoint = None
        # The slow, durable part (append + fsync, the catalog commit) runs under the writers' mutex
        # only: searches go on meanwhile, reading the published rows. Only making the rows visible
        # (publish, liveness, the coarse stage) takes the readers-writer lock.
        with self._writer:
            try:
                first = self._dense.append(vectors)
                meta = None
                if self._sets is not None and sets is not None:
                    meta = {"n_tokens": str(self._sets.append(sets.tokens))}
                replaced = self._catalog.commit_upsert(
                    keys, payloads, first, set_sizes=None if sets is None else sets.sizes.tolist(), texts=texts,
                    meta=meta,
                )
            except BaseException as exc:
                self._dense.rollback()
                if self._sets is not None:
                    self._sets.rollback()
                if is_storage_full(exc):
                    raise storage_full(exc, f"writing {len(keys)} points") from exc
                raise
            prepared = self._payload.prepare(payloads)  # payloads decoded outside the lock
            with self._lock.write():
                self._payload.add(first, prepared)
                self._dense.publish(first + len(keys))
                if self._sets is not None and sets is not None:
                    self._sets.publish(sets.sizes)
                self._append_live(len(keys))
                self._mark_dead(replaced)
                coarse = self._coarse
                if coarse is not None:
                    coarse.add(vectors)
                    if coarse.needs_rebuild():
                        self._start_rebuild()
                    if coarse.rows - self._saved_rows >= CHECKPOINT_ROWS:
                        checkpoint = (coarse.checkpoint(), coarse.rows, self._generation)
                        self._saved_rows = coarse.rows
            self._sparse_write(first, texts or [], replaced)  # after the catalog: see _sparse_write
        if checkpoint is not None:  # written with the locks released: searches and writes go on
            self._save_checkpoint(*checkpoint)

    def delete(self, ids: Sequence[PointId]) -> int:
        """Tombstone points; returns how many existed. Unknown ids are ignored."""
        keys = check_ids(ids)
        with self._writer:
            try:
                rows = self._catalog.commit_delete(keys)
            except Exception as exc:
                if is_storage_full(exc):
                    raise storage_full(exc, f"deleting {len(keys)} points") from exc
                raise
            with self._lock.write():
                self._mark_dead(rows)
            self._sparse_write(self._n_rows, [], rows)
        return len(rows)

    def _mark_dead(self, rows: np.ndarray) -> None:
        if len(rows):
            self._live[rows] = False
            self._live_rows -= bitmap(np.unique(rows))
            self._n_dead += len(rows)

    def compact(self) -> None:
        """Rewrite the files without deleted or replaced points, and refit the coarse stage."""
        with self._writer, self._lock.write():
            keep = np.flatnonzero(self._live)
            generation = self._generation + 1
            new_path = self._vectors_path(generation)
            new_path.unlink(missing_ok=True)
            fresh = DenseStore(new_path, dim=self._dense.dim, dtype=self.config.dtype, n_rows=0)
            for start in range(0, len(keep), 32768):
                block = keep[start : start + 32768]
                fresh.append(self._dense.read(block))
                fresh.publish(fresh.n_rows + len(block))
            meta = {"generation": str(generation), "n_rows": str(len(keep))}
            fresh_sets = None
            if self._sets is not None:
                fresh_sets = self._sets.compact_into(self._tokens_path(generation), keep)
                meta["n_tokens"] = str(fresh_sets.n_vectors)
            self._catalog.commit_compaction(meta)
            # Committed: the new generation is the collection; the old files go.
            old = self._dense
            self._dense, self._generation = fresh, generation
            old.close()
            old.path.unlink(missing_ok=True)
            if self._sets is not None and fresh_sets is not None:
                self._sets.close()
                self._sets.path.unlink(missing_ok=True)
                self._sets = fresh_sets
            self._live_buf = np.ones(len(keep), dtype=bool)
            self._live_rows = BitMap(range(len(keep)))
            self._n_rows = len(keep)
            self._n_dead = 0
            self._payload.rebuild(self._catalog.payloads(live_only=True))  # rows were renumbered
            coarse = coarse_mod.make_coarse(self.config, self._dense.dim)
            if coarse is not None:
                self._coarse = coarse.rebuilt(self._dense.scan, self._dense.n_rows)
                if self._coarse.ready:
                    self._write_checkpoint(self._coarse.checkpoint(), self._coarse.rows, generation)
                self._saved_rows = self._coarse.rows
            if self._sparse is not None:  # rows were renumbered: a fresh index of the live texts
                old_sparse = self._sparse
                self._sparse, self._sparse_behind = SparseStage(self._sparse_path(generation)), True
                self._sparse_write(self._n_rows, [], ())
                old_sparse.drop()
        release_free_memory()

    # -- reads --------------------------------------------------------------------------------
    def get(self, id: PointId) -> Point | None:
        """The point's id, stored vector (normalised for cosine) and payload; None if absent."""
        key = check_id(id)
        for _ in range(3):
            with self._lock.read():
                found = self._catalog.find(key)
                if found is None:
                    return None
                row, payload, text = found
                if row < self._dense.n_rows:
                    if self._sets is not None:  # a multi-vector point: its (m, dim) set
                        return Point(key, self._sets.read(row), payload)
                    return Point(key, self._dense.read(np.array([row]))[0], payload, text)
            # Committed by a write that is still making its rows visible: wait for it, then read.
            with self._writer:
                pass
        raise RuntimeError(f"point {key!r} is committed at row {row} but that row was never made visible")

    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        oversampling: float | None = None,
        filter: Any = None,
        exact: bool = False,
        with_payload: bool = True,
        text: str | Sequence[str] | None = None,
        mode: SearchMode | None = None,
        fusion: Fusion = "convex",
        nprobe: int | None = None,
        target_recall: float | None = None,
    ) -> list[list[Hit]]:
        """Per query, the ``k`` best hits, best first. ``queries``: ``(q, dim)`` or ``(dim,)``.

        With a sparse stage, ``text`` (one per query) is the lexical query and ``mode`` picks
        ``dense`` (the vectors only), ``sparse`` (BM25 over the points' text; ``queries`` may be
        None; scores are BM25 scores) or ``hybrid`` (both candidate sets, scored by the exact
        dense score, then fused with BM25's: ``fusion`` ``convex``, the mean of the two scores
        min-max normalised over the candidates, or ``rrf``, reciprocal rank fusion; scores are
        the fused ones). The default is hybrid when the collection has a sparse stage and both a
        vector and a text are given, sparse when only a text is, else dense.

        How an approximate dense search trades recall for time: ``oversampling`` (rows reranked =
        k x it) and ``nprobe`` (inverted lists probed, ivf and pq stages), or ``target_recall``:
        the cheapest setting whose calibrated recall@10 reaches it (see ``calibrate``; an exact
        search where none does). Without any of them, the collection's ``target_recall`` if it
        has one, else its fixed defaults.
        """
        return self.search_detailed(
            queries, k, oversampling=oversampling, filter=filter, exact=exact, with_payload=with_payload,
            text=text, mode=mode, fusion=fusion, nprobe=nprobe, target_recall=target_recall,
        ).hits

    def search_detailed(
        self,
        queries: Any,
        k: int = 10,
        *,
        oversampling: float | None = None,
        filter: Any = None,
        exact: bool = False,
        with_payload: bool = True,
        text: str | Sequence[str] | None = None,
        mode: SearchMode | None = None,
        fusion: Fusion = "convex",
        nprobe: int | None = None,
        target_recall: float | None = None,
    ) -> SearchResult:
        """``search`` with the time spent in each stage, the number of rows reranked, and the
        setting it ran with."""
        texts = [text] if isinstance(text, str) else None if text is None else list(text)
        mode = self._mode(queries, texts, mode)
        if fusion not in ("convex", "rrf"):
            raise InvalidArgument(f"fusion must be convex or rrf, got {fusion!r}")
        self._check_nprobe(nprobe)
        target = self._target(target_recall, oversampling=oversampling, nprobe=nprobe, exact=exact, mode=mode)
        if mode != "dense" and texts is not None and self._sparse is not None:  # (_mode checked both)
            return self._search_lexical(self._sparse, queries, texts, k, mode, oversampling=oversampling,
                                        filter=filter, with_payload=with_payload, fusion=fusion, exact=exact,
                                        nprobe=nprobe)
        query_sets: list[np.ndarray] | None = None
        code_queries: np.ndarray | None = None
        if self._fde is not None:
            if isinstance(queries, np.ndarray) and queries.ndim == 2:
                queries = [queries]  # one query set
            query_sets = check_vector_sets(
                queries, dim=self.config.dim, normalize=self._normalize, max_vectors=self._max_vectors, what="queries"
            )
            q = self._fde.encode_queries(query_sets)
        else:
            q = check_vectors(queries, dim=self.config.dim, normalize=self._normalize, what="queries")
        k = check_k(k)
        factor = check_oversampling(oversampling, self.config.effective_oversampling)
        flt = Filter.parse(filter) if filter is not None else None
        choice = self._choose(target) if target is not None else None
        if choice is not None:
            if choice.setting is None:
                exact = True  # no calibrated setting is known to reach the target
            else:
                factor, nprobe = choice.setting
        n_rerank = max(k, math.ceil(k * factor))
        with self._lock.read():
            t0 = time.perf_counter()
            coarse = self._coarse
            if coarse is not None and not coarse.ready:
                coarse = None  # too few points to train yet: the (small) collection is scanned
            indexed: bool | None = None
            allowed = Allowed.of_mask(self._live, self.count()) if self._n_dead else None
            if flt is not None:
                passing, indexed = self._filter_rows(flt)
                allowed = Allowed.of_bitmap(passing, self._n_rows)
                # Few rows pass: score them all, read from disk in file order, when that costs
                # less than the coarse stage would (its codes scanned, in exact scores of equal
                # cost) plus its rerank (widened under a filter).
                share = allowed.count / max(self.count(), 1)
                scanned = coarse.scanned_rows(share) if coarse is not None else 0
                if allowed.count <= widened(n_rerank, share) + scanned // EXACT_COST_RATIO:
                    exact = True
            # Multi-vector: the query FDEs and the Chamfer rerank cost about as much as an exact
            # scan at 3,000 documents (43 vs 41 ms measured): below that, the scan is exact and cheaper.
            small = self._sets is not None and self.count() <= MULTIVECTOR_EXACT_POINTS
            if exact or coarse is None or small:
                t1 = time.perf_counter()
                rows, scores = (
                    self._exact(q, k, allowed)
                    if query_sets is None or self._sets is None
                    else _exact_chamfer(self._sets, query_sets, k, self._allowed_rows(allowed))
                )
                candidates = allowed.count if allowed is not None else self.count()
            else:
                shortlist = math.ceil(n_rerank * self.config.shortlist_factor)
                if query_sets is not None and self._fde is not None:
                    # Hamming codes of the query's document-style FDE: dense, like the stored codes.
                    code_queries = self._fde.encode_documents(query_sets)
                candidate_rows = coarse.candidates(
                    q, n_rerank, shortlist=shortlist, allowed=allowed, code_queries=code_queries, nprobe=nprobe,
                )
                t1 = time.perf_counter()
                rows, scores = (
                    self._rerank(q, candidate_rows, k)
                    if query_sets is None or self._sets is None
                    else _rerank_chamfer(self._sets, query_sets, candidate_rows, k)
                )
                candidates = candidate_rows.shape[1]
            approximate = not (exact or coarse is None or small)
            probing = coarse.probing if approximate and coarse is not None else None
            applied = Applied(
                exact=not approximate,
                oversampling=factor if approximate else None,
                nprobe=(probing[0] if nprobe is None else min(nprobe, probing[1])) if probing is not None else None,
                target_recall=target,
                expected_recall=None if choice is None else choice.lower if approximate else 1.0,
            )
            t2 = time.perf_counter()
            hits = self._hits(rows, scores, with_payload)
        return SearchResult(hits, t1 - t0, t2 - t1, candidates, indexed, setting=applied)

    def _mode(self, queries: Any, texts: list[str] | None, mode: SearchMode | None) -> SearchMode:
        if texts is not None and not all(isinstance(t, str) for t in texts):
            raise InvalidArgument("text must be a string, or one string per query")
        return self.search_mode(mode, vector=queries is not None, text=texts is not None)

    def search_mode(self, mode: SearchMode | None, *, vector: bool, text: bool) -> SearchMode:
        """The mode a search with (or without) a query ``vector`` and ``text`` runs in (see
        ``CollectionConfig.search_mode``)."""
        return self.config.search_mode(mode, vector=vector, text=text)

    def _search_lexical(
        self, sparse: SparseStage, queries: Any, texts: list[str], k: int, mode: SearchMode, *,
        oversampling: float | None,
        filter: Any, with_payload: bool, fusion: Fusion, exact: bool = False, nprobe: int | None = None,
    ) -> SearchResult:
        """Sparse and hybrid searches (see ``search``), one query at a time (tantivy answers one)."""
        q = None
        if queries is not None:
            q = check_vectors(queries, dim=self.config.dim, normalize=self._normalize, what="queries")
            if len(q) != len(texts):
                raise InvalidArgument(f"{len(q)} query vectors but {len(texts)} texts: give one text per query")
        k = check_k(k)
        factor = check_oversampling(oversampling, self.config.effective_oversampling)
        n_candidates = max(k, math.ceil(k * factor))
        flt = Filter.parse(filter) if filter is not None else None
        sparse_s = dense_s = rerank_s = 0.0
        rows_out: list[np.ndarray] = []
        scores_out: list[np.ndarray] = []
        candidates = 0
        with self._lock.read():
            indexed: bool | None = None
            allowed = Allowed.of_mask(self._live, self.count()) if self._n_dead else None
            if flt is not None:
                passing, indexed = self._filter_rows(flt)
                allowed = Allowed.of_bitmap(passing, self._n_rows)
            dense_rows = None
            if mode == "hybrid" and q is not None and self.config.coarse != "sparse":
                t0 = time.perf_counter()
                # The dense candidates, as a dense search takes them (exact when few pass).
                dense_rows = self._dense_candidates(q, n_candidates, allowed, exact=exact, nprobe=nprobe)
                dense_s = time.perf_counter() - t0
            for i, text in enumerate(texts):
                t0 = time.perf_counter()
                lexical, bm25 = sparse.candidates(text, k if mode == "sparse" else n_candidates,
                                                        allowed=allowed)
                t1 = time.perf_counter()
                sparse_s += t1 - t0
                if q is None or mode == "sparse":  # (hybrid has a query vector: _mode checked it)
                    rows_out.append(lexical[:k])
                    scores_out.append(bm25[:k])
                    candidates = max(candidates, len(lexical))
                    continue
                union = lexical if dense_rows is None else np.union1d(lexical, dense_rows[i][dense_rows[i] >= 0])
                ranked, dense_scores = self._rerank(q[i : i + 1], union[None, :], len(union))
                keep = ranked[0] >= 0
                rows, fused = (
                    rrf(ranked[0][keep], lexical, k) if fusion == "rrf"
                    else convex(ranked[0][keep], dense_scores[0][keep], lexical, bm25, k)
                )
                rerank_s += time.perf_counter() - t1
                rows_out.append(rows)
                scores_out.append(fused)
                candidates = max(candidates, len(union))
            width = max([len(r) for r in rows_out] + [0])
            rows_arr = np.array([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows_out], dtype=np.int64)
            scores_arr = np.array([np.pad(s, (0, width - len(s))) for s in scores_out], dtype=np.float32)
            hits = self._hits(rows_arr.reshape(len(texts), width), scores_arr.reshape(len(texts), width), with_payload)
        return SearchResult(hits, dense_s, rerank_s, candidates, indexed, sparse_s=sparse_s, mode=mode)

    def _dense_candidates(
        self, q: np.ndarray, n: int, allowed: Allowed | None, *, exact: bool, nprobe: int | None = None,
    ) -> np.ndarray:
        """``(q, n')`` rows the dense side of a hybrid search reranks: the coarse stage's, or the
        exact top ``n`` when asked (``exact``), when there is no stage yet, or few rows pass."""
        coarse = self._coarse if self._coarse is not None and self._coarse.ready else None
        if exact or coarse is None or (allowed is not None and allowed.rows is not None and allowed.count <= n):
            return self._exact(q, n, allowed)[0]
        return coarse.candidates(q, n, shortlist=math.ceil(n * self.config.shortlist_factor), allowed=allowed,
                                 nprobe=nprobe)

    # -- recall: settings, target recall and calibration -----------------------------------------
    def _check_nprobe(self, nprobe: Any) -> None:
        if nprobe is None:
            return
        if not isinstance(nprobe, int) or isinstance(nprobe, bool) or not 1 <= nprobe <= 65_536:
            raise InvalidArgument(f"nprobe must be an integer from 1 to 65536, got {nprobe!r}")
        if self.config.coarse not in ("ivf", "pq"):
            raise InvalidArgument(
                f"nprobe sets the inverted lists an ivf or pq stage probes, and this collection's coarse stage "
                f"is {self.config.coarse!r}: drop it (oversampling sets how many rows are reranked)"
            )

    def _target(
        self, target_recall: Any, *, oversampling: float | None, nprobe: int | None, exact: bool, mode: SearchMode,
    ) -> float | None:
        """The recall a search aims for: its own, or the collection's default when it sets no knob."""
        if target_recall is None:
            knobs = oversampling is not None or nprobe is not None or exact
            return self.config.target_recall if mode == "dense" and not knobs else None
        if (not isinstance(target_recall, int | float) or isinstance(target_recall, bool)
                or not 0 < target_recall <= 1):
            raise InvalidArgument(f"target_recall must be a number in (0, 1], such as 0.95; got {target_recall!r}")
        if oversampling is not None or nprobe is not None:
            raise InvalidArgument("target_recall picks the oversampling and nprobe itself: give target_recall, "
                                  "or oversampling and nprobe, not both")
        if exact:
            raise InvalidArgument("exact: true already finds every neighbour (recall 1): drop target_recall or exact")
        if mode != "dense":
            raise InvalidArgument(f"target_recall is the recall of a dense search against an exact one, and this "
                                  f"search runs in {mode} mode: drop target_recall, or search in dense mode")
        if self._fde is not None:
            raise InvalidArgument("target_recall is calibrated for single-vector collections only: set "
                                  "oversampling for a multi-vector one")
        return float(target_recall)

    @property
    def calibration(self) -> Calibration | None:
        """The recall each setting reached (see ``calibrate``); None before the first."""
        return self._calibration

    def _choose(self, target: float) -> Choice:
        """The setting a search aiming at ``target`` runs with. Calibrates first when there is
        no calibration yet (seconds at 1M points, once), and again in the background when the
        collection outgrew the one it has (which serves meanwhile, its probe depths scaled)."""
        coarse = self._coarse
        if coarse is None or not coarse.ready:
            return Choice(None, 1.0)  # the search is exact anyway
        calibration = self._calibration
        if calibration is None:
            calibration = self.calibrate(only_if_missing=True)  # concurrent first searches: one measures
            if calibration is None:
                return Choice(None, 1.0)
        probing = coarse.probing
        lists = probing[1] if probing is not None else None
        if calibration.stale(self.count(), lists):
            self._recalibrate_in_background()
        return calibration.choose(target, lists)

    def calibrate(
        self, *, queries: int = CALIBRATION_QUERIES, k: int = CALIBRATION_K, only_if_missing: bool = False,
    ) -> Calibration | None:
        """Measure the recall@``k`` of every setting of the grid (``index.recall``) on ``queries``
        of the collection's own points, each searched as a query without itself; store it
        durably; target-recall searches then choose from it. The monitor's samples are added
        to it as they come (``record_recall``). None when there is no approximate stage to
        calibrate (a flat or sparse one, too few points to train one, multi-vector points), or
        when a compaction renumbered the rows meanwhile (try again). ``only_if_missing``: return
        the calibration another thread stored meanwhile, if any, instead of measuring again.

        Each step holds the read lock for a block of queries only, so writes are not held up."""
        if self._fde is not None:
            return None
        with self._calibrating:
            if only_if_missing and self._calibration is not None:
                return self._calibration
            with self._lock.read():
                coarse = self._coarse
                if coarse is None or not coarse.ready or self.count() < 2:
                    return None
                generation = self._generation
                live = self._live.copy()
                own = np.flatnonzero(live)
                picked = np.sort(np.random.default_rng(len(own)).choice(own, size=min(queries, len(own)),
                                                                            replace=False))
                q = self._dense.read(picked)
                probing = coarse.probing
            allowed = Allowed.of_mask(live, len(own))
            lists = probing[1] if probing is not None else None
            # The exact neighbours of each, itself left out; in blocks, so writes are not held up.
            truth: list[np.ndarray] = []
            for start in range(0, len(q), 32):
                with self._lock.read():
                    if self._generation != generation or self._closing:
                        return None
                    rows, scores = self._exact(q[start : start + 32], k + 1, allowed)
                for i, own_row in enumerate(picked[start : start + 32]):
                    truth.append(scores[i][(rows[i] != own_row) & (rows[i] >= 0)][:k])
            cells: dict[Setting, Tally] = {}
            # What each setting costs a query, timed here: its candidate search (per probe depth;
            # never less than a shallower one's, so noise cannot make probing more look cheaper),
            # plus the rows it reranks at the measured cost of scoring a row read from disk.
            search_s: dict[Setting, float] = {}
            row_s: list[float] = []
            widest = math.ceil(k * OVERSAMPLINGS[-1])
            floor = 0.0
            for nprobe in probe_grid(lists):
                # An ivf or pq stage ranks its candidates by their codes: the rows a smaller
                # oversampling reranks are the first ones of the widest, so one search serves all.
                # Others (binary: a Hamming shortlist sized from the rows wanted) search each.
                prefix = probing is not None
                for factor in (OVERSAMPLINGS[-1:] if prefix else OVERSAMPLINGS):
                    n = max(k, math.ceil(k * factor))
                    wanted = widest if prefix else n
                    blocks: list[np.ndarray] = []
                    search_t = 0.0
                    for start in range(0, len(q), CALIBRATION_BLOCK):
                        block = q[start : start + CALIBRATION_BLOCK]
                        with self._lock.read():
                            if self._generation != generation or self._closing:
                                return None
                            t0 = time.perf_counter()
                            # One more than wanted: the query's own row, when found, is left out.
                            candidates = coarse.candidates(
                                block, wanted + 1, shortlist=math.ceil((n + 1) * self.config.shortlist_factor),
                                allowed=allowed, nprobe=nprobe,
                            )
                            t1 = time.perf_counter()
                            scores = self._scores(block, candidates)
                            row_s.append((time.perf_counter() - t1) / max(int((candidates >= 0).sum()), 1))
                        search_t += t1 - t0
                        blocks.append(_without_self(candidates, scores, picked[start : start + CALIBRATION_BLOCK],
                                                    wanted))
                    floor = max(floor, search_t / len(q))
                    scores = np.concatenate(blocks)
                    for each in (OVERSAMPLINGS if prefix else (factor,)):
                        setting = Setting(float(each), nprobe)
                        search_s[setting] = floor
                        width = max(k, math.ceil(k * each))
                        tally = cells.setdefault(setting, Tally())
                        for i in range(len(q)):
                            served = np.sort(scores[i, :width])[::-1][:k]
                            measured = query_recall(served[np.isfinite(served)].tolist(), truth[i].tolist(), k)
                            if measured is not None:
                                tally.add(*measured)
            per_row = float(np.median(row_s))
            costs = {s: t + max(k, math.ceil(k * s.oversampling)) * per_row for s, t in search_s.items()}
            calibration = Calibration(k, len(own), lists, time.time(), cells, costs)
            with self._writer:
                if self._closed:
                    return None
                try:
                    self._catalog.set_meta({CALIBRATION_META: calibration.to_json()})
                    self._calibration_saved = 0
                except Exception:  # a full disk: serve from it anyway, store it with the next samples
                    logger.warning("%s: could not store the recall calibration", self.path.name, exc_info=True)
                    self._calibration_saved = 1
                self._calibration = calibration
            logger.info("%s: recall calibrated on %d of its points (%d settings)", self.path.name, len(q), len(cells))
            return calibration

    def record_recall(self, setting: Setting, k: int, recall: float, neighbours: int) -> None:
        """Add a live monitor sample of an unfiltered search at ``setting`` to the calibration
        (samples at another k, or at a setting it does not hold, are left out). Stored every
        CALIBRATION_SAVE_EVERY samples, and on close."""
        calibration = self._calibration
        if calibration is None or k != calibration.k or not calibration.record(setting, recall, neighbours):
            return
        self._calibration_saved += 1
        if self._calibration_saved >= CALIBRATION_SAVE_EVERY:
            self._save_calibration()

    def _save_calibration(self) -> None:
        with self._writer:
            if self._calibration is not None and self._calibration_saved and not self._closed:
                self._set_meta_or_full({CALIBRATION_META: self._calibration.to_json()},
                                       "storing the recall calibration")
                self._calibration_saved = 0

    def _recalibrate_in_background(self) -> None:
        with self._recalibration_lock:
            if self._closing or (self._recalibration is not None and self._recalibration.is_alive()):
                return

            def work() -> None:
                try:
                    self.calibrate()
                except Exception:  # closed meanwhile, or a full disk: the next search tries again
                    logger.warning("%s: background recall calibration failed", self.path.name, exc_info=True)

            self._recalibration = threading.Thread(target=work, name=f"calibrate-{self.path.name}", daemon=True)
            self._recalibration.start()

    # -- filters and payload indexes ------------------------------------------------------------
    def _filter_rows(self, flt: Filter) -> tuple[BitMap, bool]:
        """The live rows that pass ``flt``, and whether every key it names has a payload index.
        A key without one is read from the catalog for this query (slower, same answers)."""
        built: dict[str, FieldIndex] = {}
        needs = flt.needs()

        def resolve(key: str, need: set[Need]) -> FieldIndex:
            field = self._payload.resolve(key, need)
            if field is not None:
                return field
            if key not in built:
                # Dead rows too: the live bitmap decides, so that a write being published is
                # seen the same way as by the declared indexes.
                built[key] = PayloadIndexes.build_for(key, needs[key], self._catalog.key_values(key, live_only=False))
            return built[key]

        def rows_of_ids(ids: tuple[PointId, ...]) -> BitMap:
            return bitmap(np.sort(self._catalog.rows_of_ids(check_ids(list(dict.fromkeys(ids))))))

        return flt.rows(self._live_rows, resolve, rows_of_ids), not built

    def scroll(
        self, *, filter: Any = None, limit: int = 10, offset: PointId | None = None, with_payload: bool = True
    ) -> tuple[list[tuple[PointId, dict[str, Any] | None]], PointId | None]:
        """Points in id order (integers, then strings), from ``offset`` on, at most ``limit``, that
        pass ``filter``; and the id to continue from (None: no more). ``(id, payload)`` each.
        Sorts the ids of every passing point: O(passing points) a call."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
            raise InvalidArgument(f"limit must be an integer from 1 to 10000, got {limit!r}")
        start = None if offset is None else check_id(offset)
        flt = Filter.parse(filter) if filter is not None else None
        with self._lock.read():
            rows = self._live_rows if flt is None else self._filter_rows(flt)[0]
            found = self._catalog.describe(rows_of(rows).tolist(), with_payload=False)

            def order(key: PointId) -> tuple[bool, int, str]:
                return (isinstance(key, str), key if isinstance(key, int) else 0, key if isinstance(key, str) else "")

            ids = sorted((key for key, _ in found.values()), key=order)
            if start is not None:
                ids = [key for key in ids if order(key) >= order(start)]
            page, rest = ids[:limit], ids[limit : limit + 1]
            row_of = {key: row for row, (key, _) in found.items()}
            payloads = self._catalog.describe([row_of[key] for key in page], with_payload=with_payload)
            return [(key, payloads[row_of[key]][1]) for key in page], (rest[0] if rest else None)

    def count(self, filter: Any = None) -> int:
        """Live points, or those that pass ``filter`` (exact)."""
        return self.count_detailed(filter)[0]

    def count_detailed(self, filter: Any = None) -> tuple[int, bool | None]:
        """``count``, and whether every key of the filter has a payload index (None: no filter)."""
        if filter is None:
            return int(self._n_rows - self._n_dead), None
        flt = Filter.parse(filter)
        with self._lock.read():
            rows, indexed = self._filter_rows(flt)
            return len(rows), indexed

    def facet(self, key: str, *, filter: Any = None, limit: int = 100) -> tuple[list[tuple[Any, int]], bool]:
        """Points per string or boolean value of ``key`` among those passing ``filter``, most
        first (ties by value), at most ``limit`` values; and whether a keyword or bool index
        answered. A key without one is read from the stored payloads for this call (slower)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000:
            raise InvalidArgument(f"limit must be an integer from 1 to 10000, got {limit!r}")
        if not isinstance(key, str) or not KEY.match(key):
            raise InvalidArgument(f"facet key {key!r}: letters, digits, '_', '-', dotted for nesting")
        flt = Filter.parse(filter) if filter is not None else None
        with self._lock.read():
            kind = self._payload.types.get(key)
            if kind in ("keyword", "bool"):
                field = self._payload.fields[key]
            elif kind is not None:
                raise InvalidArgument(
                    f"facets count strings and booleans, and {key!r} is indexed as {kind}: facet a "
                    "keyword or bool key, or drop that index"
                )
            else:
                values = self._catalog.key_values(key, live_only=False)
                field = PayloadIndexes.build_for(key, {"string", "bool"}, values)
            allowed = self._live_rows if flt is None else self._filter_rows(flt)[0]
            return field.counts(allowed)[:limit], kind is not None

    def create_payload_index(self, key: str, type: PayloadType) -> bool:
        """Index ``key`` as ``type`` over the existing points, then on every write. False if it
        was indexed so already; another type replaces the index. Durable once it returns."""
        PayloadIndexes.check(key, type)
        with self._writer:
            if self._payload.types.get(key) == type:
                return False
            field = PayloadIndexes.build(key, type, self._catalog.key_values(key, live_only=True))
            types = {**self._payload.types, key: type}
            self._set_meta_or_full({"payload_indexes": json.dumps(types)}, f"indexing {key!r}")
            with self._lock.write():
                self._payload.types = types
                self._payload.fields[key] = field
        return True

    def drop_payload_index(self, key: str) -> bool:
        """Stop indexing ``key``; False if it had no index. Filters on it keep working, slower."""
        with self._writer:
            if key not in self._payload.types:
                return False
            types = {k: t for k, t in self._payload.types.items() if k != key}
            self._set_meta_or_full({"payload_indexes": json.dumps(types)}, f"dropping the index of {key!r}")
            with self._lock.write():
                self._payload.types = types
                del self._payload.fields[key]
        return True

    def payload_indexes(self) -> dict[str, dict[str, Any]]:
        """``key -> {"type", "points", "ram_bytes"}`` of every payload index."""
        with self._lock.read():
            return {
                key: {"type": type, "points": len(self._payload.fields[key].present() & self._live_rows),
                      "ram_bytes": self._payload.fields[key].ram_bytes()}
                for key, type in self._payload.types.items()
            }

    def _set_meta_or_full(self, items: dict[str, str], doing: str) -> None:
        try:
            self._catalog.set_meta(items)
        except Exception as exc:
            if is_storage_full(exc):
                raise storage_full(exc, doing) from exc
            raise

    def _exact(
        self, q: np.ndarray, k: int, allowed: Allowed | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the stored vectors: ``(q, k)`` rows and scores, -1 padded."""
        if allowed is not None and allowed.rows is not None and allowed.count <= EXACT_GATHER_ROWS:
            rows = allowed.rows.astype(np.int64)
            return _top_rows(q @ self._dense.read(rows).T, rows[None, :].repeat(len(q), 0), k)
        mask = None if allowed is None else allowed.mask()
        best_rows = np.full((len(q), 0), -1, dtype=np.int64)
        best_scores = np.empty((len(q), 0), dtype=np.float32)
        for start, block in self._dense.scan():
            scores = q @ block.T
            if mask is not None:
                scores[:, ~mask[start : start + len(block)]] = -np.inf
            rows = np.arange(start, start + len(block), dtype=np.int64)[None, :].repeat(len(q), 0)
            best_rows, best_scores = _top_rows(
                np.concatenate([best_scores, scores], axis=1), np.concatenate([best_rows, rows], axis=1), k
            )
        return best_rows, best_scores

    def _rerank(self, q: np.ndarray, candidate_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best candidates by their exact scores, read from disk: ``(q, k')`` rows and scores."""
        return _top_rows(self._scores(q, candidate_rows), candidate_rows, k)

    def _scores(self, q: np.ndarray, candidate_rows: np.ndarray) -> np.ndarray:
        """Exact scores of the candidates ``(q, c)``, in their order, -inf for padding (-1); read
        from disk once per block of queries."""
        out = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
        for start in range(0, len(q), 64):  # bounds the (queries, candidates, dim) gather
            block = candidate_rows[start : start + 64]
            unique = np.unique(block[block >= 0])
            if len(unique):
                vectors = self._dense.read(unique)
                position = np.searchsorted(unique, np.maximum(block, 0))
                scores = np.einsum("qcd,qd->qc", vectors[position], q[start : start + 64])
                out[start : start + 64] = np.where(block >= 0, scores, -np.inf)
        return out

    def _allowed_rows(self, allowed: Allowed | None) -> np.ndarray:
        if allowed is not None and allowed.rows is not None:
            return allowed.rows.astype(np.int64)
        return np.flatnonzero(self._live if allowed is None else allowed.mask())

    def _hits(self, rows: np.ndarray, scores: np.ndarray, with_payload: bool) -> list[list[Hit]]:
        described = self._catalog.describe(np.unique(rows[rows >= 0]).tolist(), with_payload=with_payload)
        return [
            [
                Hit(described[r][0], float(s), described[r][1])
                for r, s in zip(rr.tolist(), ss.tolist(), strict=True)
                if r >= 0
            ]
            for rr, ss in zip(rows, scores, strict=True)
        ]

    def stats(self) -> CollectionStats:
        ram = self._live_buf.nbytes + (self._coarse.ram_bytes() if self._coarse is not None else 0)
        ram += len(self._live_rows.serialize()) + sum(i["ram_bytes"] for i in self.payload_indexes().values())
        disk = sum(_size(f) for f in self.path.iterdir())
        if self._sparse is not None:
            disk += self._sparse.disk_bytes()
        return CollectionStats(self.count(), int(ram), int(disk))

    # -- files --------------------------------------------------------------------------------
    @property
    def _normalize(self) -> bool:
        return self.config.metric == "cosine"

    def _vectors_path(self, generation: int) -> Path:
        return self.path / f"vectors.{generation}.{'f32' if self.config.dtype == 'float32' else 'f16'}"

    def _sparse_write(self, first_row: int, texts: Sequence[str | None], deleted: Any) -> None:
        """Index rows ``first_row...`` in the sparse stage and drop ``deleted`` (under the writers'
        mutex, after the catalog committed them). The catalog is the truth: when the stage may be
        behind it (``_sparse_behind``), every live row above its last committed one is indexed
        from the catalog instead, these included. A failure is logged, not raised: the points
        are durable and found by dense search, and the next write or open indexes them."""
        if self._sparse is None:
            return
        try:
            if self._sparse_behind:
                self._sparse.catch_up(self._catalog.texts(after_row=self._sparse.last_row()))
                self._sparse_behind = False
                texts = []
            self._sparse.write(first_row, texts, deleted)
        except Exception:
            self._sparse_behind = True
            logger.exception("%s: the sparse stage could not index rows from %d; they are stored, and the "
                             "next write or open indexes them", self.path, first_row)

    def _sparse_path(self, generation: int) -> Path:
        return self.path / f"sparse.{generation}"

    def _tokens_path(self, generation: int) -> Path:
        return self.path / f"tokens.{generation}.{'f32' if self.config.dtype == 'float32' else 'f16'}"

    def _remove_stale_files(self) -> None:
        """Files of an older generation or of an interrupted compaction."""
        current = {self._vectors_path(self._generation).name, self._tokens_path(self._generation).name}
        for f in [*self.path.glob("vectors.*"), *self.path.glob("tokens.*")]:
            if f.name not in current:
                f.unlink()
        for d in self.path.glob("sparse.*"):
            if d.name != self._sparse_path(self._generation).name:
                shutil.rmtree(d, ignore_errors=True)

    def _save_checkpoint(self, write: coarse_mod.Checkpoint, rows: int, generation: int) -> None:
        """Write a captured checkpoint unless another is being written (the next one will do)."""
        if self._checkpoint_lock.acquire(blocking=False):
            try:
                self._write_checkpoint(write, rows, generation, locked=True)
            finally:
                self._checkpoint_lock.release()

    def _write_checkpoint(
        self, write: coarse_mod.Checkpoint, rows: int, generation: int, *, locked: bool = False
    ) -> None:
        """Write a checkpoint of ``rows`` rows captured at ``generation``; skipped if the collection
        was compacted since or closed. Best effort: a collection opened without an up-to-date
        checkpoint rebuilds it from the vectors, so a full disk costs time, not data."""
        if not locked:
            with self._checkpoint_lock:
                return self._write_checkpoint(write, rows, generation, locked=True)
        if generation != self._generation or self._closed:
            return None
        try:
            tag = f"{generation}-{rows}-{uuid.uuid4().hex[:6]}"
            state = write(self.path, tag)
            state.update(kind=self.config.coarse, generation=generation)
            coarse_mod.save_state(self.path, state)
            for f in self.path.glob("coarse.*"):
                if f.name not in ("coarse.json", state.get("file")):
                    f.unlink(missing_ok=True)
        except (OSError, RuntimeError) as exc:  # faiss raises RuntimeError
            logger.warning("coarse checkpoint of %s not written (%s); it is rebuilt on open", self.path, exc)
            for f in self.path.glob("coarse.*.tmp"):
                f.unlink(missing_ok=True)

    def _load_coarse(self) -> None:
        """Load the last coarse checkpoint and catch up with the rows committed after it.

        A checkpoint that is missing, unreadable, of another generation or ahead of the catalog is
        not trusted: the coarse stage is rebuilt from the dense vectors, the source of truth.
        """
        coarse = self._coarse
        if coarse is None:
            return
        n_rows = self._dense.n_rows
        try:
            state = json.loads((self.path / "coarse.json").read_text())
            if state.get("generation") != self._generation or state.get("kind") != self.config.coarse:
                raise ValueError("checkpoint of another generation or kind")
            if int(state["rows"]) > n_rows:
                raise ValueError("checkpoint ahead of the catalog")
            coarse.load(self.path, state)
            self._saved_rows = coarse.rows
        except (OSError, ValueError, KeyError, RuntimeError):
            self._coarse = coarse = coarse.rebuilt(self._dense.scan, n_rows)
            if n_rows and coarse.ready:
                self._write_checkpoint(coarse.checkpoint(), coarse.rows, self._generation)
                self._saved_rows = coarse.rows
            return
        if coarse.rows < n_rows:
            for start in range(coarse.rows, n_rows, 32768):
                coarse.add(self._dense.read_range(start, min(start + 32768, n_rows)))
            if coarse.ready:
                self._write_checkpoint(coarse.checkpoint(), coarse.rows, self._generation)
                self._saved_rows = coarse.rows
        if coarse.needs_rebuild():
            self._start_rebuild()

    # -- background rebuilds -------------------------------------------------------------------
    def _start_rebuild(self) -> None:
        """Rebuild the coarse stage from the rows committed now, on a background thread, and
        again while the swapped-in stage still needs it (the collection grew fast meanwhile).
        Called with the write lock held (or before the collection is shared)."""

        def work(cancel: threading.Event) -> bool:
            swapped = False
            while True:
                with self._lock.read():
                    stage, dense, generation, rows = self._coarse, self._dense, self._generation, self._dense.n_rows
                if stage is None:
                    return swapped

                def scan(dense: DenseStore = dense, rows: int = rows) -> coarse_mod.Chunks:
                    for start, block in dense.scan(stop=rows):
                        if cancel.is_set():
                            raise Cancelled
                        yield start, block

                if not self._rebuild_and_swap(stage.rebuilt(scan, rows), generation, cancel):
                    return swapped
                swapped = True
                with self._lock.read():
                    if self._coarse is None or not self._coarse.needs_rebuild():
                        return swapped

        self.rebuilds.start(work)

    def _rebuild_and_swap(self, fresh: CoarseStage, generation: int, cancel: threading.Event) -> bool:
        """Catch ``fresh`` up with the rows written since it was built, checkpoint it, swap it in."""
        t0 = time.perf_counter()
        if not self._catch_up(fresh, generation, cancel):
            return False
        # Written before it is shared, so nothing changes it meanwhile; rows are caught up on open.
        self._write_checkpoint(fresh.checkpoint(), fresh.rows, generation)
        saved = fresh.rows
        if not self._catch_up(fresh, generation, cancel):  # the rows written during the checkpoint
            return False
        with self._lock.write():
            if generation != self._generation or cancel.is_set():
                return False
            end = self._dense.n_rows
            if fresh.rows < end:
                fresh.add(self._dense.read_range(fresh.rows, end))
            self._coarse = fresh
            self._saved_rows = saved
            swapped_in = time.perf_counter() - t0
        logger.info("coarse stage of %s rebuilt over %d rows (caught up and swapped in %.2f s)",
                    self.path, fresh.rows, swapped_in)
        return True

    def _catch_up(self, fresh: CoarseStage, generation: int, cancel: threading.Event) -> bool:
        """Add the committed rows ``fresh`` lacks, a chunk at a time, outside the write lock, until
        at most ``SWAP_CATCH_UP_ROWS`` are left. False if the collection was compacted meanwhile."""
        while True:
            if cancel.is_set():
                raise Cancelled
            with self._lock.read():
                if generation != self._generation:
                    return False  # compacted meanwhile: the compaction built its own stage
                start, end = fresh.rows, self._dense.n_rows
                if end - start <= SWAP_CATCH_UP_ROWS:
                    return True
                block = self._dense.read_range(start, min(end, start + 32768))
            fresh.add(block)

    def snapshot(self, target: str | Path) -> None:
        """A consistent copy of the collection in the new folder ``target``, to open with
        ``Collection.open``: taken under the writers' lock (writes wait, searches go on). The
        catalog is copied with SQLite's online backup; the other files as they are (a coarse
        checkpoint that does not match is rebuilt on open, as after a crash). The sparse stage is
        left out (tantivy merges its files in the background): the copy re-indexes it from the
        catalog's texts when opened."""
        target = Path(target)
        target.mkdir(parents=True)
        with self._writer, self._checkpoint_lock:
            self._catalog.backup(target / CATALOG)
            for entry in self.path.iterdir():
                if (entry.name.startswith((CATALOG, "sparse.")) or entry.name.endswith(".tmp")
                        or entry.name == RESERVE):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, target / entry.name)
                else:
                    shutil.copy2(entry, target / entry.name)

    def drop(self) -> None:
        """Close the collection and delete its directory."""
        self.close(checkpoint=False)
        shutil.rmtree(self.path)


def _without_self(candidates: np.ndarray, scores: np.ndarray, own: np.ndarray, width: int) -> np.ndarray:
    """The exact scores of each query's first ``width`` candidates other than its own row (a
    query drawn from the collection finds itself; a real query has no such row), -inf padded."""
    out = np.full((len(candidates), width), -np.inf, dtype=np.float32)
    for i, row in enumerate(own.tolist()):
        kept = scores[i][candidates[i] != row][:width]
        out[i, : len(kept)] = kept
    return out


def _load_calibration(raw: str | None, path: Path) -> Calibration | None:
    if raw is None:
        return None
    try:
        return Calibration.of_json(raw)
    except (ValueError, KeyError, TypeError):
        logger.warning("%s: unreadable recall calibration, measured again on the next target-recall search", path)
        return None


def _size(path: Path) -> int:
    """Bytes of a file; 0 for a folder or a file removed meanwhile (a checkpoint replaced)."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


def _keep_reserve(path: Path) -> None:
    """A small file that ``open`` deletes when the disk is too full for SQLite to open the
    catalog; made again (best effort) once there is room."""
    reserve = path / RESERVE
    if not reserve.exists():
        try:
            with open(reserve, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)
        except OSError:
            reserve.unlink(missing_ok=True)


def _release_reserve(path: Path) -> bool:
    reserve = path / RESERVE
    if not reserve.exists():
        return False
    reserve.unlink()
    logger.warning("%s: the disk is full; released the collection's %d-byte reserve to open it", path, RESERVE_BYTES)
    return True


def _rerank_chamfer(
    sets: VectorSetStore, query_sets: list[np.ndarray], candidate_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact Chamfer (MaxSim) of each query set against its candidates' stored vector sets."""
    scores = np.full(candidate_rows.shape, -np.inf, dtype=np.float32)
    for i, query in enumerate(query_sets):
        valid = np.flatnonzero(candidate_rows[i] >= 0)
        if len(valid):
            scores[i, valid] = sets.chamfer(query, candidate_rows[i, valid])
    return _top_rows(scores, candidate_rows, k)


def _exact_chamfer(
    sets: VectorSetStore, query_sets: list[np.ndarray], k: int, rows_all: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force Chamfer over the given (ascending) points, in file order, a block at a time."""
    best_rows = np.full((len(query_sets), 0), -1, dtype=np.int64)
    best_scores = np.empty((len(query_sets), 0), dtype=np.float32)
    for rows in sets.blocks(rows_all):
        scores = np.stack([sets.chamfer(query, rows) for query in query_sets])
        best_rows, best_scores = _top_rows(
            np.concatenate([best_scores, scores], axis=1),
            np.concatenate([best_rows, rows[None, :].repeat(len(query_sets), 0)], axis=1),
            k,
        )
    return best_rows, best_scores


def _top_rows(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` (q, c), the k best: ``(q, min(k, c))`` rows and scores, best first."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        rows = np.take_along_axis(rows, part, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)
    rows = np.take_along_axis(rows, order, axis=1)
    rows = np.where(np.isfinite(scores), rows, -1)
    return rows, scores


#: The convex fusion's weight of the dense score (BM25's: 1 - it), both min-max normalised over
#: the candidates of the query. Chosen by benchmarks/hybrid_bench.py on two corpora (README
#: "Sparse and hybrid"): every weight from 0.4 to 0.7 beat reciprocal rank fusion (k = 60) on
#: both, by 0.015-0.03 nDCG@10; 0.5, the weight that prefers neither, was within 0.002 and 0.008
#: of the best one on each, so no weight is tuned to one corpus.
DENSE_WEIGHT = 0.5


def convex(ranked: np.ndarray, dense_scores: np.ndarray, lexical: np.ndarray, bm25: np.ndarray,
           k: int, *, weight: float = DENSE_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of the candidate rows ``ranked`` (with their exact ``dense_scores``) by
    ``weight`` x dense + (1 - weight) x BM25, each min-max normalised over the candidates; a
    row BM25 did not return has BM25 score 0. Ties by row."""
    if not len(ranked):
        return np.empty(0, np.int64), np.empty(0, np.float32)
    lexical_score = dict(zip(lexical.tolist(), bm25.tolist(), strict=True))
    b = np.array([lexical_score.get(r, 0.0) for r in ranked.tolist()], dtype=np.float64)
    fused = weight * _minmax(dense_scores.astype(np.float64)) + (1 - weight) * _minmax(b)
    order = np.lexsort((ranked, -fused))[:k]
    return ranked[order].astype(np.int64), fused[order].astype(np.float32)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


#: Reciprocal rank fusion's constant (Cormack, Clarke and Buettcher, SIGIR 2009): a hit at rank r
#: (1-based) in a ranking adds 1 / (RRF_K + r). 60 is the paper's value and the one Elasticsearch,
#: Qdrant and Weaviate use; it needs no score scale, so it carries from one corpus to another.
RRF_K = 60


def rrf(dense: np.ndarray, lexical: np.ndarray, k: int, *, k_rrf: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows by reciprocal rank fusion of two rankings (rows, best first), and their
    fused scores. A row missing from a ranking gets nothing from it."""
    fused: dict[int, float] = {}
    for ranking in (dense, lexical):
        for rank, row in enumerate(ranking.tolist(), start=1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k_rrf + rank)
    best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
    return (np.array([r for r, _ in best], dtype=np.int64), np.array([f for _, f in best], dtype=np.float32))
