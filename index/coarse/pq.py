"""faiss IVF-PQ codes with 8-bit sub-quantizers: the ``pq`` coarse stage (the compressed stage of the
bi-granular design). Trained once the collection holds ``TRAIN_ROWS`` points; until then the
collection scans its (small) disk matrix."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import device
from index.coarse.base import Checkpoint, Scan, filtered_nprobe, sample, search_ivf, write_faiss
from index.row_sets import Allowed

logger = logging.getLogger(__name__)


class PQCoarse:
    TRAIN_ROWS = 10_000

    def __init__(self, dim: int, *, probe_fraction: float = 0.25) -> None:
        self.dim = dim
        self.probe_fraction = probe_fraction
        # Stored vectors are normalised for cosine, so inner product serves both metrics.
        self.metric = faiss.METRIC_INNER_PRODUCT
        # 48 one-byte sub-quantizers for 384 dims: 48 + 8 (id) bytes a vector, under the 64-byte budget.
        self.m = max(d for d in range(1, 49) if dim % d == 0)
        self.index: Any = None
        self._pending = 0  # rows seen before training
        self._gpu_index: device.GpuIndex | None = None  # a GPU copy for unfiltered searches

    @property
    def rows(self) -> int:
        return int(self.index.ntotal) if self.index is not None else self._pending

    @property
    def ready(self) -> bool:
        return self.index is not None

    def add(self, vectors: np.ndarray) -> None:
        if self.index is None:
            self._pending += len(vectors)
        else:
            rows = np.ascontiguousarray(vectors, dtype=np.float32)
            self.index.add(rows)
            if self._gpu_index is not None:
                self._gpu_index.add(rows)

    def needs_rebuild(self) -> bool:
        return self.index is None and self._pending >= self.TRAIN_ROWS

    def rebuilt(self, scan: Scan, rows: int) -> PQCoarse:
        """A new stage trained on a sample of the rows, then filled with all of them."""
        fresh = PQCoarse(self.dim, probe_fraction=self.probe_fraction)
        n = rows
        if n < self.TRAIN_ROWS:
            fresh._pending = n
            return fresh
        nlist = int(min(4096, max(16, math.sqrt(n)), n // 39))  # faiss wants >= 39 points a list
        want = min(n, max(256 * 40, 40 * nlist))
        quantizer = faiss.IndexFlat(self.dim, self.metric)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.m, 8, self.metric)
        index.train(sample(scan, n, want))
        for _, block in scan():
            index.add(block)
        index.nprobe = self._nprobe(nlist)
        fresh.index = index
        fresh._copy_to_gpu()
        return fresh

    def _nprobe(self, nlist: int) -> int:
        return min(nlist, max(16, math.ceil(nlist * self.probe_fraction)))

    def _copy_to_gpu(self) -> None:
        gpu = device.gpu()
        self._gpu_index = None
        # GPU IVF searches probe at most GPU_MAX_K lists; a wider probe stays on the CPU.
        if gpu is not None and self.index is not None and self.index.nprobe <= device.GPU_MAX_K:
            try:
                self._gpu_index = gpu.ivf_copy(self.index)
            except RuntimeError as exc:  # e.g. a sub-quantizer count faiss's GPU IVF-PQ lacks
                logger.warning("PQ coarse stage stays on the CPU: faiss could not copy it to the GPU (%s)", exc)

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
        default = nprobe is None or nprobe == int(self.index.nprobe)  # the GPU copy probes the default
        if self._gpu_index is not None and allowed is None and n <= device.GPU_MAX_K and default:
            # faiss's GPU IVF takes no IDSelector: filtered searches stay on the CPU.
            return self._gpu_index.search(np.ascontiguousarray(queries, dtype=np.float32), n)
        probes = int(self.index.nprobe) if nprobe is None else min(int(self.index.nlist), nprobe)
        return search_ivf(self.index, queries, n, nprobe=probes, allowed=allowed)

    @property
    def probing(self) -> tuple[int, int] | None:
        return (int(self.index.nprobe), int(self.index.nlist)) if self.index is not None else None

    def scanned_rows(self, share: float = 1.0) -> int:
        if self.index is None:
            return 0
        return int(self.index.ntotal * filtered_nprobe(self.index.nprobe, self.index.nlist, share) // self.index.nlist)

    def ram_bytes(self) -> int:
        if self.index is None:
            return 0
        centroids = self.index.nlist * self.dim * 4
        pq_tables = self.dim * 256 * 4
        return int(self.index.ntotal * (self.index.code_size + 8) + centroids + pq_tables)

    def checkpoint(self) -> Checkpoint:
        if self.index is None:
            state = {"file": None, "rows": self._pending}
            return lambda directory, tag: state
        return write_faiss(self.index, {"rows": self.rows})

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        if state.get("file") is None:  # untrained: rows were only counted
            self.index, self._pending, self._gpu_index = None, int(state["rows"]), None
            return
        self.index = faiss.read_index(str(directory / state["file"]))
        self.index.nprobe = self._nprobe(self.index.nlist)
        self._copy_to_gpu()
