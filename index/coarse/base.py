"""What every coarse stage shares: the protocol the collection talks to, and small pieces of faiss glue.

A coarse stage holds compact codes in RAM and picks candidate rows for the exact rerank. It never
reads the dense file itself: the collection hands it vectors (``add``) or a ``Scan`` over all rows
(``rebuilt``). Rebuilding never mutates a stage that searches are using: ``rebuilt`` returns a new
stage, which the collection swaps in (see ``index.rebuild``).

Every stage keeps faiss to one OpenMP thread per search call: on the 2-core machine we measured
single-query ``IndexBinaryFlat.search`` over 1M codes at 8.4 ms with 1 thread and 117 ms with 2.
Concurrency comes from concurrent searches in separate threads instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from index.coarse.lists import ListMembership, filtered_share, widened
from index.row_sets import Allowed

Chunks = Iterable[tuple[int, np.ndarray]]  # (first_row, (c, dim) float32) from DenseStore.scan
Scan = Callable[[], Chunks]  # a fresh pass over the rows each call
Checkpoint = Callable[[Path, str], dict[str, Any]]  # (directory, tag) -> state


class CoarseStage(Protocol):
    """The in-RAM stage of a collection. Rows are numbered 0..rows-1 in the order added."""

    @property
    def rows(self) -> int: ...

    @property
    def ready(self) -> bool:
        """False while there is too little data to search with (the collection scans exactly)."""
        ...

    def add(self, vectors: np.ndarray) -> None:
        """Append rows ``(m, dim) float32``; they are searchable when this returns."""

    def candidates(
        self,
        queries: np.ndarray,
        n: int,
        *,
        shortlist: int,
        allowed: Allowed | None,
        code_queries: np.ndarray | None = None,
        nprobe: int | None = None,
    ) -> np.ndarray:
        """At least the best ``n`` rows per query among the ``allowed`` ones (None: all),
        ``(q, n') int64`` padded with -1; more under a filter (``lists.widened``). ``nprobe``:
        lists to probe instead of the stage's default (stages without lists ignore it)."""
        ...

    @property
    def probing(self) -> tuple[int, int] | None:
        """``(default lists probed, lists)`` of a stage that probes inverted lists, else None."""
        ...

    def ram_bytes(self) -> int: ...

    def scanned_rows(self, share: float = 1.0) -> int:
        """Codes a search scans per query under a filter that leaves ``share`` of the rows (what
        a filtered search weighs exact scoring of those rows against)."""
        ...

    def needs_rebuild(self) -> bool:
        """The stage no longer fits the collection (it grew past what it was trained for)."""
        ...

    def rebuilt(self, scan: Scan, rows: int) -> CoarseStage:
        """A new stage trained and filled from ``scan`` (``rows`` rows); ``self`` is left
        untouched, so searches can keep using it while this runs in the background."""
        ...

    def checkpoint(self) -> Checkpoint:
        """Capture the stage now, in memory (a copy: cheap next to writing it). The returned
        function writes the files (atomically) and returns the state that ``load`` takes; it
        runs after the collection's lock is released, so searches never wait on the disk."""
        ...

    def load(self, directory: Path, state: dict[str, Any]) -> None: ...


def selector(allowed: Allowed | None) -> tuple[Any, Any]:
    """faiss selector over the allowed rows (None: everything). Returns it and its buffer,
    which must outlive the search."""
    if allowed is None:
        return None, None
    return faiss.IDSelectorBitmap(len(allowed.bits), faiss.swig_ptr(allowed.bits)), allowed.bits


def write_faiss(index: Any, state: dict[str, Any]) -> Checkpoint:
    """A checkpoint of a faiss index: serialized now, written to ``coarse.<tag>.faiss`` later."""
    data = faiss.serialize_index(index)

    def write(directory: Path, tag: str) -> dict[str, Any]:
        path = directory / f"coarse.{tag}.faiss"
        atomic_write(path, lambda name: data.tofile(name))
        return {"file": path.name, **state}

    return write


def filtered_nprobe(nprobe: int, nlist: int, share: float) -> int:
    """Lists to probe under a filter that leaves ``share`` of the rows, when the rows per list
    that pass are not known (see ``index.coarse.lists``)."""
    return min(nlist, math.ceil(nlist * filtered_share(nprobe, nlist, share)))


def search_ivf(
    index: Any,
    queries: np.ndarray,
    n: int,
    *,
    nprobe: int,
    allowed: Allowed | None,
    lists: ListMembership | None = None,
) -> np.ndarray:
    """``n`` rows per query from a faiss IVF index, among the allowed rows only, on one thread:
    ``(q, n') int64`` padded with -1, where ``n' >= n`` under a filter (``lists.widened``).

    Unfiltered (``allowed`` None, or masking deleted rows only), the ``nprobe`` nearest lists
    are probed. Under a filter (``allowed.rows``), the lists ``lists`` chooses for it (or,
    without it, more of the nearest). A query left with fewer than ``n``
    rows while more pass is searched again over every list: whenever ``n`` rows pass, ``n``
    come back."""
    sel, _keep = selector(allowed)  # _keep: the bitmap must outlive the search
    nlist = int(index.nlist)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.omp_set_num_threads(1)
    passing = int(index.ntotal) if allowed is None else allowed.count
    if allowed is not None and allowed.rows is not None and lists is not None:
        assign, dis, local = lists.probes(queries, allowed.rows, nprobe)
        probed = assign.shape[1]
        n = max(widened(n, float(share)) for share in local)
        distances = np.empty((len(queries), n), dtype=np.float32)
        rows = np.empty((len(queries), n), dtype=np.int64)
        index.search_preassigned_c(
            len(queries), faiss.swig_ptr(queries), n, faiss.swig_ptr(assign), faiss.swig_ptr(dis),
            faiss.swig_ptr(distances), faiss.swig_ptr(rows), False, _ivf_params(probed, sel),
        )
    else:
        if allowed is not None and allowed.rows is not None:
            share = passing / max(int(index.ntotal), 1)
            nprobe = filtered_nprobe(nprobe, nlist, share)
            n = widened(n, share)
        probed = nprobe
        _, rows = index.search(queries, n, params=_ivf_params(nprobe, sel))
    short = np.flatnonzero((rows >= 0).sum(axis=1) < min(n, passing))
    if len(short) and probed < nlist:
        _, rows[short] = index.search(queries[short], n, params=_ivf_params(nlist, sel))
    return rows


def _ivf_params(nprobe: int, sel: Any) -> Any:
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if sel is not None:
        params.sel = sel
    return params


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_name)``, fsync, then rename over ``path``: readers see the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sample(scan: Scan, n: int, size: int) -> np.ndarray:
    """A seeded random sample of ``size`` of the ``n`` rows, ``(size, dim) float32``, in one pass."""
    keep = np.sort(np.random.default_rng(0).choice(n, size=size, replace=False))
    return np.concatenate(
        [block[keep[(keep >= start) & (keep < start + len(block))] - start] for start, block in scan()]
    )


def top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest scores, best first."""
    if len(scores) > n:
        part = np.argpartition(-scores, n - 1)[:n]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


def build_threads() -> int:
    """Threads for training and bulk adds (never for searches, see the module doc)."""
    return os.cpu_count() or 1
