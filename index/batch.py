"""Validation of what callers hand the library: ids, vectors, payloads, queries.

Everything is checked before anything is written, and every error says what to fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.errors import (
    DimensionMismatch,
    DuplicateId,
    EmptyBatch,
    InvalidArgument,
    InvalidId,
    InvalidPayload,
    InvalidVector,
)

PointId = str | int

MAX_ID_LENGTH = 512
_MAX_INT_ID = 2**63 - 1  # SQLite's INTEGER range


def check_id(value: Any, where: str = "id") -> PointId:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidId(f"{where} must be a string or a non-negative integer, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= _MAX_INT_ID:
            raise InvalidId(f"{where} = {value}: integer ids must be non-negative and below 2**63")
    elif not value or len(value) > MAX_ID_LENGTH:
        raise InvalidId(f"{where}: string ids must have 1 to {MAX_ID_LENGTH} characters")
    return value


def check_texts(texts: Sequence[Any] | None, n: int) -> list[str | None] | None:
    """``texts`` as one string (or None) per point, or None if not given; raises InvalidArgument."""
    if texts is None:
        return None
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence) or len(texts) != n:
        raise InvalidArgument(f"texts must be a list of {n} strings or None, one per point")
    for i, text in enumerate(texts):
        if text is not None and not isinstance(text, str):
            raise InvalidArgument(f"texts[{i}] must be a string or None, got {type(text).__name__}")
    return list(texts)


def check_ids(ids: Sequence[Any]) -> list[PointId]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
        raise InvalidId("ids must be a list of strings or non-negative integers")
    checked = [check_id(v.item() if isinstance(v, np.integer) else v, f"ids[{i}]") for i, v in enumerate(ids)]
    if not checked:
        raise EmptyBatch("the batch is empty: pass at least one id")
    seen: dict[PointId, int] = {}
    for i, key in enumerate(checked):
        if key in seen:
            raise DuplicateId(
                f"id {key!r} appears twice in the batch (ids[{seen[key]}] and ids[{i}]): send each id once"
            )
        seen[key] = i
    return checked


def check_vectors(vectors: Any, *, dim: int, normalize: bool, what: str = "vectors") -> np.ndarray:
    """``(n, dim)`` (or one ``(dim,)``) of finite numbers -> ``(n, dim) float32``, normalised if asked."""
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        if "inhomogeneous" in str(exc):
            raise DimensionMismatch(f"{what} is ragged: every vector must have exactly {dim} numbers") from None
        raise InvalidVector(f"{what} must be numbers in an (n, {dim}) array: {exc}") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise DimensionMismatch(f"{what} must be an (n, {dim}) array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise EmptyBatch(f"{what} is empty: pass at least one vector")
    if array.shape[1] != dim:
        raise DimensionMismatch(f"{what} have dimension {array.shape[1]}, but the collection's dim is {dim}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise InvalidVector(f"{what}[{int(np.flatnonzero(~finite)[0])}] contains NaN or inf: send finite numbers")
    if normalize:
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        zero = norms[:, 0] == 0
        if zero.any():
            raise InvalidVector(
                f"{what}[{int(np.flatnonzero(zero)[0])}] is all zeros: a cosine collection cannot normalise it"
            )
        array = array / norms
    return np.ascontiguousarray(array, dtype=np.float32)


def check_payloads(payloads: Sequence[Any] | None, n: int) -> list[str | None]:
    """Payloads -> their JSON text (None where absent)."""
    if payloads is None:
        return [None] * n
    if isinstance(payloads, dict) or len(payloads) != n:
        raise InvalidPayload(f"payloads must be a list with one entry per id ({n}), or None")
    out: list[str | None] = []
    for i, payload in enumerate(payloads):
        if payload is None:
            out.append(None)
            continue
        if not isinstance(payload, dict):
            raise InvalidPayload(f"payloads[{i}] must be a JSON object (a dict), got {type(payload).__name__}")
        try:
            out.append(json.dumps(payload, allow_nan=False, separators=(",", ":")))
        except (TypeError, ValueError) as exc:
            raise InvalidPayload(f"payloads[{i}] is not JSON-serialisable: {exc}") from None
    return out


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidArgument(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def check_oversampling(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"oversampling must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PointBatch:
    """A validated upsert: ids, ``(n, dim) float32`` vectors, payloads as JSON text."""

    ids: list[PointId]
    vectors: np.ndarray
    payloads: list[str | None]

    @classmethod
    def build(
        cls, ids: Sequence[Any], vectors: Any, payloads: Sequence[Any] | None, *, dim: int, normalize: bool
    ) -> PointBatch:
        checked_ids = check_ids(ids)
        array = check_vectors(vectors, dim=dim, normalize=normalize)
        if len(array) != len(checked_ids):
            raise DimensionMismatch(f"got {len(checked_ids)} ids but {len(array)} vectors: send one vector per id")
        return cls(checked_ids, array, check_payloads(payloads, len(checked_ids)))


@dataclass(frozen=True)
class VectorSetBatch:
    """A validated multi-vector upsert: per point a ``(m_i, dim) float32`` set, concatenated."""

    ids: list[PointId]
    tokens: np.ndarray  # (sum m_i, dim) float32, normalised under cosine
    sizes: np.ndarray  # (n,) int64, m_i
    payloads: list[str | None]

    def sets(self) -> list[np.ndarray]:
        return np.split(self.tokens, np.cumsum(self.sizes)[:-1])

    @classmethod
    def build(
        cls, ids: Sequence[Any], vector_sets: Any, payloads: Sequence[Any] | None, *,
        dim: int, normalize: bool, max_vectors: int,
    ) -> VectorSetBatch:
        checked_ids = check_ids(ids)
        sets = check_vector_sets(vector_sets, dim=dim, normalize=normalize, max_vectors=max_vectors)
        if len(sets) != len(checked_ids):
            raise DimensionMismatch(f"got {len(checked_ids)} ids but {len(sets)} vector sets: send one set per id")
        sizes = np.array([len(s) for s in sets], dtype=np.int64)
        return cls(checked_ids, np.concatenate(sets), sizes, check_payloads(payloads, len(checked_ids)))


def check_vector_sets(
    vector_sets: Any, *, dim: int, normalize: bool, max_vectors: int, what: str = "vectors"
) -> list[np.ndarray]:
    """A list of ``(m_i, dim)`` sets (or one ``(n, m, dim)`` array) -> list of float32 arrays."""
    if isinstance(vector_sets, np.ndarray) and vector_sets.ndim == 3:
        vector_sets = list(vector_sets)
    if isinstance(vector_sets, str | bytes | dict) or not isinstance(vector_sets, Sequence | np.ndarray):
        raise InvalidVector(f"{what} must be a list of vector sets, each an (m, {dim}) array")
    if len(vector_sets) == 0:
        raise EmptyBatch(f"{what} is empty: pass at least one vector set")
    out = []
    for i, one in enumerate(vector_sets):
        label = f"{what}[{i}]"
        if isinstance(one, Sequence | np.ndarray) and len(one) == 0:
            raise EmptyBatch(f"{label} is an empty vector set: a multi-vector point needs at least one vector")
        array = check_vectors(one, dim=dim, normalize=normalize, what=label)
        if len(array) > max_vectors:
            raise InvalidArgument(
                f"{label} holds {len(array)} vectors; this collection accepts at most {max_vectors} "
                "per point (multivector.max_vectors)"
            )
        out.append(array)
    return out
