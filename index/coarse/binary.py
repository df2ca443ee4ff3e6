"""Sign bits in one flat buffer, scanned whole by Hamming distance: the ``binary`` coarse stage.

One sign bit per dimension (48 bytes for 384 dims), in row order in one numpy buffer that faiss's
``knn_hamming`` scans without an index of its own. A Hamming shortlist is rescored in RAM with the
float query against the +-1 codes (asymmetric distance) so that far fewer rows are read from disk.
A whole scan costs about 8 ns a code on one core (8.4 ms at 1M): this kind is for small
collections and for multi-vector FDEs; ``ivf`` is the one that grows sub-linearly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import device
from index.coarse.base import Checkpoint, Scan, atomic_write, top
from index.coarse.lists import widened
from index.row_sets import Allowed


class BinaryCoarse:
    """Sign bits of the (transformed) vectors, searched by Hamming distance over all rows.

    ``transform``: ``sign`` of the raw vector, ``center`` (minus the corpus mean), or ``rotate``
    (a fixed random orthogonal rotation). ``benchmarks/index_bench.py`` measures all three.
    """

    #: Re-estimate the mean (and re-encode) when the collection doubles, up to this size.
    REFIT_LIMIT = 2_000_000

    def __init__(self, dim: int, transform: str, *, seed: int = 0) -> None:
        self.dim = dim
        self.transform = transform
        self.seed = seed
        self.code_size = (dim + 7) // 8
        self.mean = np.zeros(dim, dtype=np.float32)
        self.fit_rows = 0
        self.rotation = (
            np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))[0].astype(np.float32)
            if transform == "rotate"
            else None
        )
        self._buffer = np.empty((0, self.code_size), dtype=np.uint8)
        self._n = 0
        self._gpu_codes = self._new_gpu_codes()

    @property
    def rows(self) -> int:
        return self._n

    @property
    def ready(self) -> bool:
        return True

    @property
    def codes(self) -> np.ndarray:
        """``(rows, code_size) uint8``, a view of the buffer."""
        return self._buffer[: self._n]

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        out = vectors - self.mean if self.transform == "center" else vectors
        if self.rotation is not None:
            out = out @ self.rotation
        return np.ascontiguousarray(out, dtype=np.float32)

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        """``(n, dim) float32`` -> ``(n, code_size) uint8`` packed sign bits."""
        return np.packbits(self._project(vectors) > 0, axis=1)

    def add(self, vectors: np.ndarray) -> None:
        if self.fit_rows == 0:
            if self.transform == "center":
                self.mean = vectors.mean(axis=0, dtype=np.float64).astype(np.float32)
            self.fit_rows = len(vectors)
        self._append(self.encode(vectors))

    def _new_gpu_codes(self) -> device.GpuIndex | None:
        """An empty GPU copy of the codes for the whole-collection scan, when faiss runs on a GPU."""
        gpu = device.gpu()
        return gpu.binary_flat(self.code_size * 8) if gpu is not None else None

    def _append(self, codes: np.ndarray) -> None:
        need = self._n + len(codes)
        if need > len(self._buffer):
            # Grow by 1/8: the RAM budget (<= 64 bytes a vector) has little room for slack.
            grown = np.empty((max(need, len(self._buffer) * 9 // 8, 1024), self.code_size), dtype=np.uint8)
            grown[: self._n] = self.codes
            self._buffer = grown
        self._buffer[self._n : need] = codes
        self._n = need
        if self._gpu_codes is not None:
            self._gpu_codes.add(self._buffer[need - len(codes) : need])

    def needs_rebuild(self) -> bool:
        return self.transform == "center" and self.fit_rows < self.rows // 2 and self.fit_rows < self.REFIT_LIMIT

    def rebuilt(self, scan: Scan, rows: int) -> BinaryCoarse:
        """A new stage over all rows, with the mean re-estimated over all of them."""
        fresh = BinaryCoarse(self.dim, self.transform, seed=self.seed)
        if self.transform == "center":
            total = np.zeros(self.dim, dtype=np.float64)
            n = 0
            for _, block in scan():
                total += block.sum(axis=0, dtype=np.float64)
                n += len(block)
            fresh.mean = (total / max(n, 1)).astype(np.float32)
        for _, block in scan():
            fresh._append(fresh.encode(block))
        fresh.fit_rows = fresh.rows
        return fresh

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
        """Best ``n`` rows per query (more under a filter, ``lists.widened``), ``(q, n) int64``
        padded with -1.

        A Hamming shortlist of ``shortlist`` rows is rescored asymmetrically in RAM:
        ``<q', b>`` with ``b`` in {-1, +1}^dim, ``q'`` the transformed float query.
        ``code_queries``: what to take the query's sign bits from, when not the query itself
        (a query FDE is sparse; its document-style FDE is dense like the codes it is compared to).
        """
        projected = self._project(queries)
        qcodes = self.encode(code_queries if code_queries is not None else queries)
        if allowed is not None and allowed.rows is not None:
            n = widened(n, allowed.count / max(self.rows, 1))
        width = max(n, shortlist)
        faiss.omp_set_num_threads(1)
        out = np.full((len(queries), n), -1, dtype=np.int64)
        for i in range(len(queries)):
            rows = self._shortlist(qcodes[i : i + 1], width, None if allowed is None else allowed.mask())
            if width > n and len(rows) > n:
                rows = rows[top(bit_products(projected[i], np.take(self._buffer, rows, axis=0)), n)]
            out[i, : len(rows)] = rows[:n]
        return out

    def _shortlist(self, qcode: np.ndarray, width: int, allowed: np.ndarray | None) -> np.ndarray:
        """The ``width`` rows nearest in Hamming distance among the allowed ones, ``(m,) int64``."""
        rows = None
        if allowed is not None:
            excluded = self._n - int(np.count_nonzero(allowed[: self._n]))
            if excluded <= 4 * width:
                # A few tombstones: scan everything a little wider, then drop them.
                wide = self._scan_all(qcode, min(width + excluded, self._n), "mc")
                kept: np.ndarray = wide[wide >= 0]
                kept = kept[allowed[kept]][:width]
                return kept
            rows = np.flatnonzero(allowed[: self._n])
        # A heap ("hc") is faster for short lists, counting distances ("mc") for long ones.
        variant = "mc" if width > 256 else "hc"
        if rows is None:
            found = self._scan_all(qcode, min(width, self._n), variant)
        else:
            if len(rows) == 0:
                return rows
            # np.take, not fancy indexing: 1.4 ms instead of 14 ms for 121k rows of 48 bytes.
            subset = np.take(self._buffer, rows, axis=0)
            _, local = faiss.knn_hamming(qcode, subset, min(width, len(rows)), variant=variant)
            found = rows[local[0]]
        result: np.ndarray = found[found >= 0]
        return result

    def _scan_all(self, qcode: np.ndarray, k: int, variant: str) -> np.ndarray:
        """The ``k`` rows of all codes nearest the ``(1, code_size)`` query code, ``(k,) int64``."""
        if self._gpu_codes is not None and 0 < k <= device.GPU_MAX_K:
            found = self._gpu_codes.search(qcode, k)
        else:
            _, found = faiss.knn_hamming(qcode, self.codes, k, variant=variant)
        result: np.ndarray = found[0]
        return result

    def scanned_rows(self, share: float = 1.0) -> int:
        return self.rows  # every code, every query

    @property
    def probing(self) -> tuple[int, int] | None:
        return None  # every code is scanned

    def ram_bytes(self) -> int:
        extra = self.mean.nbytes + (self.rotation.nbytes if self.rotation is not None else 0)
        return int(self._buffer.nbytes + extra)

    def checkpoint(self) -> Checkpoint:
        arrays = {"codes": self.codes.copy(), "mean": self.mean.copy()}
        state = {"rows": self.rows, "fit_rows": self.fit_rows}

        def write(directory: Path, tag: str) -> dict[str, Any]:
            path = directory / f"coarse.{tag}.npz"

            def savez(name: str) -> None:
                with open(name, "wb") as f:
                    np.savez(f, **arrays)  # type: ignore[arg-type]  # stub confuses **arrays with allow_pickle

            atomic_write(path, savez)
            return {"file": path.name, **state}

        return write

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        with np.load(directory / state["file"]) as data:
            codes, self.mean = data["codes"], data["mean"]
        if codes.shape != (state["rows"], self.code_size):
            raise ValueError(f"coarse file holds {codes.shape}, expected ({state['rows']}, {self.code_size})")
        self._n = 0
        self._gpu_codes = self._new_gpu_codes()
        self._append(codes)
        self.fit_rows = int(state["fit_rows"])


def bit_products(query: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``<query, b>`` for each packed 0/1 code row ``b`` of ``codes`` ``(s, code_size) uint8``.

    Ranks like ``<q, 2b - 1> = 2 <q, b> - sum(q)``. Each code byte selects one of 256 partial sums
    of its 8 query components from a table built once per query: ``s * code_size`` lookups
    instead of unpacking ``s * dim`` bits to floats (for 10,240-bit FDE codes, 1,200 rows:
    7 ms instead of 14 ms).
    """
    size = codes.shape[1]
    padded = np.zeros(size * 8, dtype=np.float32)
    padded[: len(query)] = query
    parts = padded.reshape(size, 8)
    table = np.zeros((size, 1), dtype=np.float32)  # (code_size, 256) once every bit is in
    for bit in range(7, -1, -1):  # packbits puts a byte's first component in its top bit
        table = np.concatenate([table, table + parts[:, bit : bit + 1]], axis=1)
    index = codes + np.arange(0, size * 256, 256, dtype=np.int32)
    products: np.ndarray = np.take(table.ravel(), index).sum(axis=1)
    return products


