"""An inverted file of 4-bit PQ codes scanned by faiss's FastScan kernel: the ``ivf`` coarse stage.

Rows are grouped by their nearest of ``nlist`` k-means centroids; each list is one contiguous,
SIMD-friendly block of codes (faiss ``IndexIVFPQFastScan``). A query scans only the ``nprobe``
lists nearest to it, in C++, with 16-entry lookup tables held in registers: no Python gather.

Sizing (``benchmarks/coarse_bench.py``, real MiniLM vectors, README "Performance"):
- ``bits`` per dimension: ``dim * bits / 4`` sub-quantizers of 4 bits, so 1 bit gives 48-byte
  codes for 384 dims, like sign bits, but ranked by an asymmetric (float query) distance.
  2 and 4 bits rank finer: on the glosses 40-80 rows read from disk gave the recall that
  1 bit needed 160 for, for 2x and 4x the RAM.
- ``nlist = LISTS_PER_SQRT * sqrt(rows)`` and a fixed ``nprobe``: the codes scanned per query grow
  as sqrt(rows), not as rows. sqrt(rows) lists gave more recall at the same nprobe than 2x and 4x
  as many on both real corpora, for about the same time.
- Rebuilt in the background (``index.rebuild``) each time the collection doubles past the rows
  it was trained on, so that lists stay about sqrt(rows) long.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.coarse.base import Checkpoint, Scan, sample, search_ivf, write_faiss
from index.coarse.lists import ListMembership, filtered_share
from index.row_sets import Allowed


class IVFCoarse:
    #: Below this many rows the collection scans exactly: on the glosses an exact scan took 0.34 ms
    #: at 5,000 rows against 0.57 ms for the two stages, 0.94 against 0.70 ms at 10,000.
    TRAIN_ROWS = 8_000
    #: Lists per square root of the rows it is trained on.
    LISTS_PER_SQRT = 1.0
    #: Lists probed per query (the default probe depth). With sqrt(rows) lists, recall@10 (160
    #: rows reranked) at 128 / 256 lists: glosses 0.994 / 0.999, npm summaries 0.981 / 0.994, the
    #: 1M set 0.987 / 0.991 (coarse_bench). 256 keeps 0.99 on all three.
    NPROBE = 256
    #: Retrain once the collection holds this many times the rows the lists were trained on:
    #: lists stay within sqrt(2) of sqrt(rows) long, for one background rebuild per doubling.
    REGROW = 2
    #: k-means sample: this many rows per list (faiss warns below 39).
    SAMPLE_PER_LIST = 64
    #: From this many lists on, the nearest lists are found through an HNSW graph over the
    #: centroids instead of a flat scan of all of them.
    HNSW_LISTS = 4096

    def __init__(self, dim: int, *, bits: int = 1, nprobe: int | None = None) -> None:
        if bits not in (1, 2, 4):
            raise ValueError(f"bits must be 1, 2 or 4, got {bits}")
        self.dim = dim
        self.bits = bits
        self.nprobe_setting = nprobe
        # dim * bits / 4 sub-quantizers of 4 bits each, dividing dim evenly.
        want = max(1, dim * bits // 4)
        self.m = max(m for m in range(1, want + 1) if dim % m == 0)
        self.index: Any = None
        self.lists: ListMembership | None = None  # the list of each row, for filtered searches
        self.trained_rows = 0
        self._pending = 0  # rows seen while untrained
        self._ram: tuple[tuple[int, bool], int] = ((-1, False), 0)  # ((rows, lists built), bytes) last measured

    # -- state --------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.index.ntotal) if self.index is not None else self._pending

    @property
    def ready(self) -> bool:
        return self.index is not None

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.index is not None else 0

    @property
    def nprobe(self) -> int:
        """Lists scanned per query."""
        return min(self.nlist, self.nprobe_setting or self.NPROBE)

    @property
    def probing(self) -> tuple[int, int] | None:
        return (self.nprobe, self.nlist) if self.index is not None else None

    @classmethod
    def lists_for(cls, rows: int) -> int:
        return max(1, min(rows // 39, round(cls.LISTS_PER_SQRT * math.sqrt(rows))))

    # -- writes -------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray) -> None:
        if self.index is None:
            self._pending += len(vectors)
        elif self.lists is not None:
            self.lists.add(np.ascontiguousarray(vectors, dtype=np.float32))
        else:
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def needs_rebuild(self) -> bool:
        if self.index is None:
            return self._pending >= self.TRAIN_ROWS
        return self.rows >= self.REGROW * self.trained_rows

    def rebuilt(self, scan: Scan, rows: int) -> IVFCoarse:
        """A new stage: k-means lists and PQ codebooks trained on a sample, then every row added."""
        fresh = IVFCoarse(self.dim, bits=self.bits, nprobe=self.nprobe_setting)
        n = rows
        if n < self.TRAIN_ROWS:
            fresh._pending = n
            return fresh
        nlist = self.lists_for(n)
        if nlist >= self.HNSW_LISTS:
            quantizer: Any = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efSearch = 2 * self.NPROBE
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
        # Stored vectors are unit length for cosine, so inner product serves both metrics.
        index = faiss.IndexIVFPQFastScan(quantizer, self.dim, nlist, self.m, 4, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True
        quantizer.this.disown()  # the index owns (and frees) its quantizer
        # Codes of the vectors themselves, not of their residuals to the centroid: on 59k gloss
        # vectors (200 lists, 128 probed, 160 candidates) recall@10 was 0.9945 against 0.9525.
        index.by_residual = False
        index.train(sample(scan, n, min(n, self.SAMPLE_PER_LIST * nlist)))
        for _, block in scan():
            index.add(block)
        fresh.index = index
        fresh.trained_rows = n
        return fresh

    # -- reads --------------------------------------------------------------------------------
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
        """Best ``n`` rows per query by the codes' asymmetric inner product, ``(q, n) int64``.

        ``shortlist`` is not used: the codes are already ranked against the float query.
        """
        if allowed is not None and allowed.rows is not None and self.lists is None:
            # Built on the first filtered search (a pass over the lists' ids, ~10 ms at 1M rows),
            # then kept in step with adds: collections never filtered do not pay its 2 B a row.
            self.lists = ListMembership(self.index)
        probes = self.nprobe if nprobe is None else min(self.nlist, nprobe)
        return search_ivf(self.index, queries, n, nprobe=probes, allowed=allowed, lists=self.lists)

    def scanned_rows(self, share: float = 1.0) -> int:
        if self.index is None:
            return 0
        return math.ceil(self.rows * filtered_share(self.nprobe, self.nlist, share))

    def ram_bytes(self) -> int:
        """Codes (padded to FastScan's blocks of 32), 8-byte ids, centroids and their graph."""
        if self.index is None:
            return 0
        if self._ram[0] != (self.rows, self.lists is not None):
            invlists = self.index.invlists
            sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], dtype=np.int64)
            bbs = int(self.index.bbs)
            padded = int(((sizes + bbs - 1) // bbs * bbs).sum())
            codes = padded * int(self.index.M2) // 2 + int(sizes.sum()) * 8
            quantizer = self.nlist * self.dim * 4
            if self.nlist >= self.HNSW_LISTS:
                quantizer += self.nlist * 2 * 32 * 4  # level-0 links dominate the graph
            lists = self.lists.ram_bytes() if self.lists is not None else 0
            tables = self.m * 16 * (self.dim // self.m) * 4
            self._ram = ((self.rows, self.lists is not None), codes + quantizer + tables + lists)
        return self._ram[1]

    # -- files --------------------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        if self.index is None:
            state = {"file": None, "rows": self._pending, "bits": self.bits}
            return lambda directory, tag: state
        return write_faiss(self.index, {"rows": self.rows, "trained_rows": self.trained_rows,
                                                    "bits": self.bits})

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        if state.get("bits") != self.bits:
            raise ValueError(f"checkpoint holds {state.get('bits')}-bit codes, the collection wants {self.bits}")
        if state.get("file") is None:  # untrained: rows were only counted
            self.index, self._pending, self.trained_rows = None, int(state["rows"]), 0
            return
        index = faiss.read_index(str(directory / state["file"]))
        if index.ntotal != state["rows"] or index.d != self.dim:
            raise ValueError(f"coarse file holds {index.ntotal} x {index.d}, expected {state['rows']} x {self.dim}")
        self.index = index
        self.lists = None
        self.trained_rows = int(state["trained_rows"])
