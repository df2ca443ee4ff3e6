"""Sets of rows in the three forms a search needs: roaring bitmaps (filters), ascending arrays
(exact scoring, per-list counts) and packed bits (faiss's ``IDSelectorBitmap``), with cheap
conversions between them.

Packing a roaring bitmap bit by bit costs ~2 ms at 500k rows of 1M (scatter into a bool mask,
then ``np.packbits``). ``packed_bits`` instead reads roaring's portable serialization, whose dense
containers already are packed bits (1024 little-endian words per 65,536 rows): 0.04 ms for the
same set (benchmarks/filter_bench.py measures the whole filtered search).
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field

import numpy as np
from pyroaring import BitMap

_CHUNK = 65_536  # rows per roaring container
_WORDS = _CHUNK // 64
_SERIAL_COOKIE = 12347  # portable format with run containers
_SERIAL_COOKIE_NO_RUN = 12346


def bitmap(rows: np.ndarray) -> BitMap:
    """A bitmap of ``rows`` (any integer dtype; ascending is fastest, repeats are fine), built
    through the buffer protocol: ~10x faster than from a numpy array, which pyroaring iterates
    element by element."""
    return BitMap(array.array("I", np.ascontiguousarray(rows, dtype=np.uint32).tobytes()))


def rows_of(bm: BitMap) -> np.ndarray:
    """The rows of a bitmap, ascending, ``(m,) uint32`` (a view of one copy)."""
    return np.frombuffer(bm.to_array(), dtype=np.uint32)


def packed_bits(bm: BitMap, n: int) -> np.ndarray:
    """``(ceil(n / 8),) uint8``: bit ``r`` (little bit order) set for each row ``r < n`` of ``bm``.

    Parses the portable serialization (github.com/RoaringBitmap/RoaringFormatSpec): a header of
    (key, cardinality - 1) per container, then bitmap containers (copied as they are), array
    containers (sorted uint16) and run containers ((start, length - 1) pairs).
    """
    words = np.zeros(max(1, -(-n // _CHUNK)) * _WORDS, dtype=np.uint64)
    data = bm.serialize()
    cookie = int.from_bytes(data[:4], "little")
    if cookie & 0xFFFF == _SERIAL_COOKIE:
        size = (cookie >> 16) + 1
        flags = np.frombuffer(data, dtype=np.uint8, count=(size + 7) // 8, offset=4)
        runs = np.unpackbits(flags, bitorder="little")[:size].tolist()
        pos = 4 + (size + 7) // 8
        offsets = size >= 4  # NO_OFFSET_THRESHOLD
    elif cookie == _SERIAL_COOKIE_NO_RUN:
        size = int.from_bytes(data[4:8], "little")
        runs, pos, offsets = [0] * size, 8, True
    else:
        raise ValueError(f"not a portable roaring serialization (cookie {cookie})")
    header = np.frombuffer(data, dtype="<u2", count=2 * size, offset=pos).reshape(size, 2).tolist()
    pos += 4 * size + (4 * size if offsets else 0)
    for (key, card), run in zip(header, runs, strict=True):
        if (key + 1) * _WORDS > len(words):
            break  # rows past n (containers come in key order)
        chunk = words[key * _WORDS : (key + 1) * _WORDS]
        if run:
            n_runs = int.from_bytes(data[pos : pos + 2], "little")
            pairs = np.frombuffer(data, dtype="<u2", count=2 * n_runs, offset=pos + 2).reshape(n_runs, 2)
            pos += 2 + 4 * n_runs
            mask = np.zeros(_CHUNK, dtype=bool)
            for start, length in pairs.tolist():
                mask[start : start + length + 1] = True
            chunk[:] = np.packbits(mask, bitorder="little").view(np.uint64)
        elif card + 1 > 4096:
            chunk[:] = np.frombuffer(data, dtype="<u8", count=_WORDS, offset=pos)
            pos += 8 * _WORDS
        else:
            mask = np.zeros(_CHUNK, dtype=bool)
            mask[np.frombuffer(data, dtype="<u2", count=card + 1, offset=pos)] = True
            pos += 2 * (card + 1)
            chunk[:] = np.packbits(mask, bitorder="little").view(np.uint64)
    bits = words.view(np.uint8)[: -(-n // 8)].copy()
    if n % 8:
        bits[-1] &= (1 << (n % 8)) - 1
    return bits


@dataclass
class Allowed:
    """The rows a search may return, out of ``n``: as packed bits, and as ascending rows when a
    filter chose them (``rows`` None: the live rows, deleted ones masked out)."""

    bits: np.ndarray  # (ceil(n / 8),) uint8, little bit order
    count: int
    n: int
    rows: np.ndarray | None = None  # (count,) uint32, ascending
    _mask: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def of_mask(cls, mask: np.ndarray, count: int) -> Allowed:
        """From a ``(n,) bool`` mask (the live rows) holding ``count`` True."""
        allowed = cls(np.packbits(mask, bitorder="little"), count, len(mask))
        allowed._mask = mask
        return allowed

    @classmethod
    def of_bitmap(cls, bm: BitMap, n: int) -> Allowed:
        """From the rows a filter chose (all below ``n``)."""
        return cls(packed_bits(bm, n), len(bm), n, rows_of(bm))

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """``(m,) bool``: which of ``rows`` (any ints) are allowed."""
        rows = np.asarray(rows, dtype=np.int64)
        inside = (rows >= 0) & (rows < self.n)
        safe = np.where(inside, rows, 0)
        bit: np.ndarray = ((self.bits[safe >> 3] >> (safe & 7)) & 1).astype(bool)
        out: np.ndarray = inside & bit
        return out

    def mask(self) -> np.ndarray:
        """``(n,) bool``."""
        if self._mask is None:
            self._mask = np.unpackbits(self.bits, count=self.n, bitorder="little").view(bool)
        return self._mask
