"""Which inverted list holds each row, and the lists a filtered IVF search probes.

An unfiltered IVF search probes the ``nprobe`` lists nearest the query and so covers about
``nprobe / nlist`` of the rows. A filtered search must cover that share of the rows that *pass*,
wherever they lie. Probing the same lists is not enough when the filter is correlated with the
vectors (a category, a language, a source): the lists nearest the query may hold few passing
rows, which yield candidates, but not the nearest passing ones. On the 1M set a filter leaving
the 60% of rows that came from npm, with half the queries among the glosses, gave recall@10
0.90 that way (benchmarks/filter_bench.py).

So a filtered search probes the ``nprobe / share ** FILTER_PROBE_EXPONENT`` lists nearest the
query, since the nearest passing rows lie farther out (as the nearest ``k / share`` rows of all
do), where ``share`` is the *local* share of passing rows: in the ``nprobe`` lists an unfiltered
search would probe. A filter that leaves 60% of the rows but few near the query is, for that
query, a selective one; one that leaves 1% of the rows, all of them near the query, is not.
The passing rows per list are counted exactly for up to ``EXACT_COUNT_ROWS`` passing rows, and
lists without one are skipped; beyond that they are estimated from an evenly spaced sample.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

#: See the module doc: how much wider than an unfiltered search a filtered one reaches.
FILTER_PROBE_EXPONENT = 0.5
#: Rows reranked under a filter: up to FILTER_WIDEN_MAX times, ``share ** -FILTER_WIDEN_EXPONENT``.
FILTER_WIDEN_MAX = 4.0
FILTER_WIDEN_EXPONENT = 0.5
#: The local share is the smaller of that in the ``nprobe`` lists nearest the query and that in
#: the ``nprobe / NEAREST_DIVISOR`` nearest.
NEAREST_DIVISOR = 16
#: Passing rows counted per list exactly up to this many; a sample of this many beyond.
EXACT_COUNT_ROWS = 65_536
#: Adds of at most this many rows find their lists by asking the quantizer (the call faiss's
#: own add makes); larger ones read what was appended to each list.
ASSIGN_ROWS = 256


def widened(n: int, share: float) -> int:
    """Candidates to rerank under a filter leaving ``share`` of the rows (near the query): the
    nearest passing rows lie farther out, where many rows score alike and codes rank them less
    surely. On the glosses (a filter leaving 12%) recall@10 was 0.9937 with 16 x k rows
    reranked, 0.9993 with 32 x k."""
    return int(math.ceil(n * min(FILTER_WIDEN_MAX, float(max(share, 1e-9)) ** -FILTER_WIDEN_EXPONENT)))


def filtered_share(nprobe: int, nlist: int, share: float) -> float:
    """The share of the passing rows a filtered search covers."""
    return float(min(1.0, nprobe / max(nlist, 1) / float(max(share, 1e-9)) ** FILTER_PROBE_EXPONENT))


class ListMembership:
    """``(rows,)`` list number of every row of a faiss IVF index, kept in step with its adds."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.nlist = int(index.nlist)
        self._dtype = np.uint16 if self.nlist <= 65_536 else np.int32
        self._of_row = np.empty(0, dtype=self._dtype)
        self._sizes = np.zeros(self.nlist, dtype=np.int64)
        self._centroids: np.ndarray | None = None
        self._read_lists(range(self.nlist))

    def _list_size(self, i: int) -> int:
        return int(self.index.invlists.list_size(i))

    def _read_lists(self, lists: Any) -> None:
        """Record the rows appended to ``lists`` since they were last read."""
        self._grow(int(self.index.ntotal))
        invlists = self.index.invlists
        for i in lists:
            size = self._list_size(int(i))
            if size > self._sizes[i]:
                ids = faiss.rev_swig_ptr(invlists.get_ids(int(i)), size)
                self._of_row[ids[self._sizes[i] :]] = i
                self._sizes[i] = size

    def _grow(self, rows: int) -> None:
        if rows > len(self._of_row):
            grown = np.zeros(max(rows, len(self._of_row) * 9 // 8), dtype=self._dtype)
            grown[: len(self._of_row)] = self._of_row
            self._of_row = grown

    def add(self, vectors: np.ndarray) -> None:
        """``index.add(vectors)``, recording the lists the rows went to."""
        first = int(self.index.ntotal)
        if len(vectors) <= ASSIGN_ROWS:
            assigned = self.index.quantizer.assign(vectors, 1).ravel()
            self.index.add(vectors)
            self._grow(first + len(vectors))
            self._of_row[first : first + len(vectors)] = assigned
            np.add.at(self._sizes, assigned, 1)
        else:
            self.index.add(vectors)
            self._read_lists(range(self.nlist))

    def ram_bytes(self) -> int:
        return int(self._of_row.nbytes + self._sizes.nbytes)

    def centroids(self) -> np.ndarray:
        """``(nlist, dim) float32``: a view of the quantizer's own vectors."""
        if self._centroids is None:
            quantizer = faiss.downcast_index(self.index.quantizer)
            flat = faiss.downcast_index(quantizer.storage) if hasattr(quantizer, "storage") else quantizer
            self._centroids = faiss.rev_swig_ptr(flat.get_xb(), self.nlist * self.index.d).reshape(self.nlist, -1)
        return self._centroids

    def probes(
        self, queries: np.ndarray, allowed_rows: np.ndarray, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query, the lists to probe under a filter that leaves ``allowed_rows`` (ascending),
        nearest first, and the query's score against each: ``(q, p) int64`` (-1 padded) and
        ``(q, p) float32``, the arguments of faiss's ``search_preassigned``; and ``(q,)`` the
        local share of passing rows."""
        m = len(allowed_rows)
        exact = m <= EXACT_COUNT_ROWS
        sample = allowed_rows if exact else allowed_rows[:: math.ceil(m / EXACT_COUNT_ROWS)]
        counts = np.bincount(self._of_row[sample], minlength=self.nlist).astype(np.float64)
        counts *= m / max(len(sample), 1)
        scores = queries @ self.centroids().T
        order = np.argsort(-scores, axis=1, kind="stable")
        held = counts[order]
        near = min(nprobe, self.nlist)
        local = held[:, :near].sum(axis=1) / np.maximum(self._sizes[order[:, :near]].sum(axis=1), 1)
        nearest = max(1, near // NEAREST_DIVISOR)
        local = np.minimum(local, held[:, :nearest].sum(axis=1) / np.maximum(
            self._sizes[order[:, :nearest]].sum(axis=1), 1))
        reach = np.ceil(near / np.maximum(local, 1e-9) ** FILTER_PROBE_EXPONENT)
        keep = np.arange(self.nlist)[None, :] < reach[:, None]
        if exact:
            keep &= held > 0
        width = int(keep.sum(axis=1).max())
        lists = np.full((len(queries), width), -1, dtype=np.int64)
        dis = np.zeros((len(queries), width), dtype=np.float32)
        for i in range(len(queries)):
            chosen = order[i, keep[i]]
            lists[i, : len(chosen)] = chosen
            dis[i, : len(chosen)] = scores[i, chosen]
        return lists, dis, local
