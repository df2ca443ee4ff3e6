"""The coarse stage, held in RAM: compact codes that pick candidates for the exact rerank.

- ``BinaryCoarse``: one sign bit per dimension (48 bytes for 384 dims) in a faiss
  ``IndexBinaryFlat``. A Hamming shortlist is rescored in RAM with the float query against the
  +-1 codes (asymmetric distance) so that far fewer rows have to be read from disk.
- ``PQCoarse``: faiss IVF-PQ codes (the compressed stage of the bi-granular design).

Both keep faiss to one OpenMP thread per call: on the 2-core machine we measured single-query
``IndexBinaryFlat.search`` over 1M codes at 8.4 ms with 1 thread and 117 ms with 2. Concurrency
comes from concurrent searches in separate threads instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from index.config import CollectionConfig

Chunks = Iterable[tuple[int, np.ndarray]]  # (first_row, (c, dim) float32) from DenseStore.scan
Scan = Callable[[], Chunks]  # a fresh pass over all rows each call


class CoarseStage(Protocol):
    rows: int  # rows 0..rows-1 are indexed

    def add(self, vectors: np.ndarray) -> None: ...
    def candidates(
        self, queries: np.ndarray, n: int, *, shortlist: int, allowed: np.ndarray | None
    ) -> np.ndarray: ...
    def ram_bytes(self) -> int: ...
    def needs_rebuild(self) -> bool: ...
    def rebuild(self, scan: Scan) -> None: ...
    def save(self, directory: Path, tag: str) -> dict[str, Any]: ...


def _selector(allowed: np.ndarray | None) -> tuple[Any, Any]:
    """faiss selector over an ``(n,) bool`` mask (None: everything). Returns it and its buffer."""
    if allowed is None:
        return None, None
    bits = np.packbits(allowed, bitorder="little")
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BinaryCoarse:
    """Sign bits of the (transformed) vectors, searched by Hamming distance.

    ``transform``: ``sign`` of the raw vector, ``center`` (minus the corpus mean), or ``rotate``
    (a fixed random orthogonal rotation). ``benchmarks/index_bench.py`` measures all three.
    """

    #: Re-estimate the mean (and re-encode) when the collection doubles, up to this size.
    REFIT_LIMIT = 2_000_000

    def __init__(self, dim: int, transform: str, *, seed: int = 0) -> None:
        self.dim = dim
        self.transform = transform
        self.mean = np.zeros(dim, dtype=np.float32)
        self.fit_rows = 0
        self.rotation = (
            np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))[0].astype(np.float32)
            if transform == "rotate"
            else None
        )
        self.index = faiss.IndexBinaryFlat(_padded_bits(dim))
        self._codes = np.empty((0, self.index.code_size), dtype=np.uint8)

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        out = vectors - self.mean if self.transform == "center" else vectors
        if self.rotation is not None:
            out = out @ self.rotation
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """``(n, dim) float32`` -> ``(n, code_size) uint8`` packed sign bits."""
        bits = self._project(vectors) > 0
        pad = self.index.d - self.dim
        if pad:
            bits = np.pad(bits, ((0, 0), (0, pad)))
        return np.packbits(bits, axis=1)

    def add(self, vectors: np.ndarray) -> None:
        if self.fit_rows == 0 and self.transform == "center":
            self.mean = vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
        if self.fit_rows == 0:
            self.fit_rows = len(vectors)
        self.index.add(self.encode(vectors))
        self._refresh_view()

    def _refresh_view(self) -> None:
        # A zero-copy view of faiss's own code array: the codes are held once, not twice.
        n, size = self.index.ntotal, self.index.code_size
        self._codes = (
            faiss.rev_swig_ptr(self.index.xb.data(), n * size).reshape(n, size)
            if n
            else np.empty((0, size), dtype=np.uint8)
        )

    def needs_rebuild(self) -> bool:
        return self.transform == "center" and self.fit_rows < self.rows // 2 and self.fit_rows < self.REFIT_LIMIT

    def rebuild(self, scan: Scan) -> None:
        """Re-estimate the mean over all rows and re-encode them: two passes over the disk."""
        if self.transform == "center":
            total = np.zeros(self.dim, dtype=np.float64)
            n = 0
            for _, block in scan():
                total += block.sum(axis=0, dtype=np.float64)
                n += len(block)
            self.mean = (total / max(n, 1)).astype(np.float32)
        self.index.reset()
        for _, block in scan():
            self.index.add(self.encode(block))
        self.fit_rows = self.rows
        self._refresh_view()

    def candidates(
        self, queries: np.ndarray, n: int, *, shortlist: int, allowed: np.ndarray | None
    ) -> np.ndarray:
        """Best ``n`` rows per query, ``(q, n) int64`` padded with -1.

        A Hamming shortlist of ``shortlist`` rows is rescored asymmetrically in RAM:
        ``<q', b>`` with ``b`` in {-1, +1}^dim, ``q'`` the transformed float query.
        """
        projected = self._project(queries)
        qcodes = self.encode(queries)
        selector, _keep = _selector(allowed)
        params = faiss.SearchParameters(sel=selector) if selector is not None else None
        width = max(n, shortlist)
        faiss.omp_set_num_threads(1)
        _, shortlist_rows = self.index.search(qcodes, width, params=params)
        if width == n:
            return shortlist_rows
        out = np.full((len(queries), n), -1, dtype=np.int64)
        for i, rows in enumerate(shortlist_rows):
            rows = rows[rows >= 0]
            bits = np.unpackbits(self._codes[rows], axis=1, count=self.dim).astype(np.float32)
            # <q, 2b - 1> = 2 <q, b> - sum(q): one matrix-vector product over 0/1 bits.
            scores = bits @ projected[i]
            top = _top(scores, n)
            out[i, : len(top)] = rows[top]
        return out

    def ram_bytes(self) -> int:
        extra = self.mean.nbytes + (self.rotation.nbytes if self.rotation is not None else 0)
        return int(self.rows * self.index.code_size + extra)

    def save(self, directory: Path, tag: str) -> dict[str, Any]:
        path = directory / f"coarse.{tag}.npz"
        _atomic_write(
            path,
            lambda name: np.savez(open(name, "wb"), codes=self._codes, mean=self.mean),
        )
        return {"file": path.name, "rows": self.rows, "fit_rows": self.fit_rows}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        with np.load(directory / state["file"]) as data:
            codes, self.mean = data["codes"], data["mean"]
        if codes.shape != (state["rows"], self.index.code_size):
            raise ValueError(f"coarse file holds {codes.shape}, expected ({state['rows']}, ...)")
        self.index.reset()
        self.index.add(codes)
        self.fit_rows = int(state["fit_rows"])
        self._refresh_view()


class PQCoarse:
    """faiss IVF-PQ codes in RAM. Trained once the collection holds ``train_rows`` points;
    until then there is nothing to search and the collection scans its (small) disk matrix."""

    TRAIN_ROWS = 10_000

    def __init__(self, dim: int) -> None:
        self.dim = dim
        # Stored vectors are normalised for cosine, so inner product serves both metrics.
        self.metric = faiss.METRIC_INNER_PRODUCT
        # 48 one-byte sub-quantizers for 384 dims: 48 + 8 (id) bytes a vector, under the 64-byte budget.
        self.m = max(d for d in range(1, 49) if dim % d == 0)
        self.index: Any = None
        self._pending = 0  # rows seen before training

    @property
    def rows(self) -> int:
        return int(self.index.ntotal) if self.index is not None else self._pending

    @property
    def trained(self) -> bool:
        return self.index is not None

    def add(self, vectors: np.ndarray) -> None:
        if self.index is None:
            self._pending += len(vectors)
        else:
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def needs_rebuild(self) -> bool:
        return self.index is None and self._pending >= self.TRAIN_ROWS

    def rebuild(self, scan: Scan) -> None:
        """Train on a sample of the rows, then add them all, one chunk at a time."""
        n = sum(len(block) for _, block in scan())
        if n < self.TRAIN_ROWS:
            self.index, self._pending = None, n
            return
        nlist = int(min(4096, max(16, 4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points a list
        want = min(n, max(256 * 40, 40 * nlist))
        keep = np.sort(np.random.default_rng(0).choice(n, size=want, replace=False))
        sample = np.concatenate(
            [block[keep[(keep >= start) & (keep < start + len(block))] - start] for start, block in scan()]
        )
        quantizer = faiss.IndexFlat(self.dim, self.metric)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.m, 8, self.metric)
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index.train(sample)
        for _, block in scan():
            index.add(block)
        index.nprobe = max(8, nlist // 16)
        self.index = index

    def candidates(
        self, queries: np.ndarray, n: int, *, shortlist: int, allowed: np.ndarray | None
    ) -> np.ndarray:
        selector, _keep = _selector(allowed)
        params = faiss.SearchParametersIVF(nprobe=self.index.nprobe)
        if selector is not None:
            params.sel = selector
        faiss.omp_set_num_threads(1)
        _, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n, params=params)
        return rows  # type: ignore[no-any-return]

    def ram_bytes(self) -> int:
        if self.index is None:
            return 0
        centroids = self.index.nlist * self.dim * 4
        pq_tables = self.dim * 256 * 4
        return int(self.index.ntotal * (self.index.code_size + 8) + centroids + pq_tables)

    def save(self, directory: Path, tag: str) -> dict[str, Any]:
        if self.index is None:
            return {"file": None, "rows": 0, "pending": self._pending}
        path = directory / f"coarse.{tag}.faiss"
        _atomic_write(path, lambda name: faiss.write_index(self.index, name))
        return {"file": path.name, "rows": self.rows}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        if state.get("file") is None:
            self.index, self._pending = None, 0
            return
        self.index = faiss.read_index(str(directory / state["file"]))
        self.index.nprobe = max(8, self.index.nlist // 16)


def make_coarse(config: CollectionConfig, dim: int) -> BinaryCoarse | PQCoarse | None:
    if config.coarse == "binary":
        return BinaryCoarse(dim, config.binary_transform)
    if config.coarse == "pq":
        return PQCoarse(dim)
    return None


def _padded_bits(dim: int) -> int:
    return (dim + 7) // 8 * 8


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest scores, best first."""
    if len(scores) > n:
        part = np.argpartition(-scores, n - 1)[:n]
        return part[np.argsort(-scores[part], kind="stable")]
    return np.argsort(-scores, kind="stable")


def save_state(directory: Path, state: dict[str, Any]) -> None:
    _atomic_write(directory / "coarse.json", lambda name: Path(name).write_text(json.dumps(state)))
