"""Full-precision vectors on disk: one append-only row-major file, read back row by row.

The file is never loaded as a whole. Search reads just its candidate rows: first a
``posix_fadvise(WILLNEED)`` per row, which queues all the reads to the disk at once (with a cold
page cache the rows then arrive in parallel instead of one seek after another), then a gather
through ``np.memmap`` in ascending offset order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from index.errors import CorruptIndex

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class DenseStore:
    def __init__(self, path: Path, *, dim: int, dtype: str, n_rows: int) -> None:
        """Open (creating if needed) the file and cut it back to ``n_rows`` committed rows.

        Extra rows are what an interrupted batch wrote before its commit: they are dropped.
        Missing rows mean the file lost committed data, which raises ``CorruptIndex``.
        """
        self.path = path
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.row_bytes = dim * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        held = size // self.row_bytes
        if held < n_rows:
            os.close(self._fd)
            raise CorruptIndex(
                f"{path.name} holds {held} rows but the catalog committed {n_rows}: the vector file "
                "was truncated or replaced; restore the collection from a backup"
            )
        if size != n_rows * self.row_bytes:
            os.ftruncate(self._fd, n_rows * self.row_bytes)
            os.fsync(self._fd)
        self.n_rows = n_rows
        #: Hint the kernel about all candidate rows before reading them (see the module doc).
        self.prefetch = True
        self._map: np.memmap | None = None
        self._remap()

    def _remap(self) -> None:
        self._map = (
            np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_rows, self.dim))
            if self.n_rows
            else None
        )

    def close(self) -> None:
        self._map = None
        os.close(self._fd)

    # -- writes -------------------------------------------------------------------------------
    def append(self, vectors: np.ndarray) -> int:
        """Write ``(n, dim)`` vectors after the committed rows and fsync; returns the first row.

        The rows are not visible (``n_rows`` unchanged) until ``publish``: the catalog commit in
        between is the commit point.
        """
        data = np.ascontiguousarray(vectors, dtype=self.dtype)
        offset = self.n_rows * self.row_bytes
        view = memoryview(data).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer; stubs lack it
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        os.fsync(self._fd)
        return self.n_rows

    def publish(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self._remap()

    def rollback(self) -> None:
        """Drop anything written past the committed rows (a failed catalog commit)."""
        os.ftruncate(self._fd, self.n_rows * self.row_bytes)

    # -- reads --------------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``(m,) int64`` -> ``(m, dim) float32``, in the order asked."""
        if len(rows) == 0 or self._map is None:
            return np.empty((0, self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        if self.prefetch and _WILLNEED is not None and len(rows) > 1:
            for offset in (ascending * self.row_bytes).tolist():
                os.posix_fadvise(self._fd, offset, self.row_bytes, _WILLNEED)
        gathered = np.take(self._map, ascending, axis=0).astype(np.float32, copy=False)
        out = np.empty_like(gathered)
        out[order] = gathered
        return out

    def read_ranges(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Rows ``starts[i]:ends[i]`` for each i, concatenated: ``(sum(ends - starts), dim) float32``."""
        stored = self.stored_ranges(starts, ends)
        return stored if stored.dtype == np.float32 and stored.flags.writeable else stored.astype(np.float32)

    def stored_ranges(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """``read_ranges`` in the stored dtype; ranges must be ascending and not overlap.

        One read hint per range, not per row: a multi-vector point's set is contiguous. Ranges
        that touch are read as one; a single run is returned as a read-only view of the file.
        """
        if len(starts) == 0 or self._map is None:
            return np.empty((0, self.dim), dtype=self.dtype)
        breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        starts, ends = starts[np.concatenate([[0], breaks])], ends[np.concatenate([breaks - 1, [len(ends) - 1]])]
        if self.prefetch and _WILLNEED is not None and len(starts) > 1:
            for start, end in zip((starts * self.row_bytes).tolist(), (ends * self.row_bytes).tolist(), strict=True):
                os.posix_fadvise(self._fd, start, end - start, _WILLNEED)
        mapped = self._map
        if len(starts) == 1:
            return np.asarray(mapped[int(starts[0]) : int(ends[0])])
        return np.concatenate([mapped[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as ``(stop - start, dim) float32`` (a copy)."""
        if self._map is None or stop <= start:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.array(self._map[start:stop], dtype=np.float32)

    def scan(self, *, chunk_rows: int = 32768, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Sequential pass over rows ``0:stop`` (all by default): ``(first_row, (c, dim) float32)`` chunks.

        The map is taken when the pass starts: rows appended meanwhile are not seen, and a pass
        can run on another thread while writes go on.
        """
        mapped = self._map
        if mapped is None:
            return
        end = self.n_rows if stop is None else min(stop, len(mapped))
        for start in range(0, end, chunk_rows):
            yield start, np.asarray(mapped[start : min(start + chunk_rows, end)], dtype=np.float32)

    def evict(self) -> None:
        """Drop this file's pages from the page cache (benchmarks of cold reads).

        Pages mapped into a process are not evicted, so the map is dropped first.
        """
        self._map = None
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._remap()
