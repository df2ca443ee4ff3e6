"""MUVERA fixed-dimensional encodings (FDE) of multi-vector sets.

Dhulipala et al., "MUVERA: Multi-Vector Retrieval via Fixed Dimensional Encodings", 2024.
A set of token vectors (for example ColBERT-style token embeddings) becomes one vector whose
inner product with another set's encoding approximates their Chamfer (MaxSim) similarity, so a
single-vector index can shortlist candidates for exact multi-vector reranking.

For each of ``r_reps`` repetitions, ``k_sim`` Gaussian hyperplanes split the space into
``2**k_sim`` SimHash buckets; each bucket holds the sum (query) or the average (document) of
its vectors, randomly projected to ``d_proj`` dimensions with a +-1 matrix scaled by
``1/sqrt(d_proj)``. An empty document bucket takes the first vector of the occupied bucket
nearest to it in Hamming distance. The repetitions are concatenated and, optionally, projected
once more to ``d_final`` dimensions.

With the same parameters and seed the encodings equal those of ``fastembed.postprocess.Muvera``
(random matrices drawn in the same order from ``numpy.random.default_rng(seed)``, bucket id bit
``j`` set when the vector lies strictly on the positive side of hyperplane ``j``, ties in
Hamming distance going to the lowest bucket id). The final projection is ours: fastembed has none.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from index.errors import DimensionMismatch, EmptyBatch, InvalidArgument, InvalidVector

__all__ = ["DEFAULT_PARAMS", "FDEEncoder", "MuveraParams", "chamfer"]

Float32Array = npt.NDArray[np.float32]
VectorSet = npt.ArrayLike  # (m, dim)
VectorSets = Sequence[VectorSet] | npt.NDArray[Any]  # n sets (m_i, dim), or (n, m, dim)

K_SIM_MAX = 10  # 2**10 buckets per repetition; matches MultiVectorConfig's bound
R_REPS_MAX = 200
# Tokens encoded per chunk: bounds the float64 working set (~tokens * (dim + r_reps * d_proj)).
_CHUNK_TOKENS = 8192
# Elements of the bucket tables: per chunk sets * r_reps * 2**k_sim * max(2**k_sim, d_proj),
# per block of empty-bucket lookups empty cells * 2**k_sim.
_CHUNK_CELLS = 1 << 24


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidArgument(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidArgument(f"{name} must be {bounds}, got {value}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class MuveraParams:
    """Parameters of the encoding; the defaults give ``20 * 32 * 16 = 10,240`` dimensions.

    Attributes:
        k_sim: SimHash hyperplanes per repetition, ``0 <= k_sim <= 10``: ``2**k_sim`` buckets.
        d_proj: dimension each bucket is projected to, ``1 <= d_proj <= dim`` (``d_proj == dim``
            keeps the bucket as is, without projection, as fastembed does).
        r_reps: independent repetitions, ``1 <= r_reps <= 200``.
        seed: seed of ``numpy.random.default_rng``, ``>= 0``.
        d_final: dimension of an optional final +-1 projection of the concatenation,
            ``1 <= d_final <= r_reps * 2**k_sim * d_proj``; ``None`` keeps the concatenation.
    """

    k_sim: int = 5
    d_proj: int = 16
    r_reps: int = 20
    seed: int = 42
    d_final: int | None = None

    def __post_init__(self) -> None:
        _check_int("k_sim", self.k_sim, low=0, high=K_SIM_MAX)
        _check_int("d_proj", self.d_proj, low=1)
        _check_int("r_reps", self.r_reps, low=1, high=R_REPS_MAX)
        _check_int("seed", self.seed, low=0)
        if self.d_final is not None:
            _check_int("d_final", self.d_final, low=1)
            if self.d_final > self.concat_dim:
                raise InvalidArgument(
                    f"cannot project to a higher dimensionality (d_final={self.d_final} > "
                    f"r_reps * 2**k_sim * d_proj={self.concat_dim}); lower d_final or use None"
                )

    @property
    def buckets(self) -> int:
        """SimHash buckets per repetition, ``2**k_sim``."""
        return 1 << self.k_sim

    @property
    def concat_dim(self) -> int:
        """Dimension before the final projection, ``r_reps * 2**k_sim * d_proj``."""
        return self.r_reps * self.buckets * self.d_proj


DEFAULT_PARAMS = MuveraParams()


class FDEEncoder:
    """Encodes vector sets of dimension ``dim`` into ``(fde_dim,)`` float32 FDEs.

    Stateless after construction (the random matrices are drawn once from the seed), so one
    encoder may be shared between threads.
    """

    def __init__(self, dim: int, *, params: MuveraParams = DEFAULT_PARAMS) -> None:
        self.dim = _check_int("dim", dim, low=1)
        if not isinstance(params, MuveraParams):
            raise InvalidArgument(f"params must be a MuveraParams, got {type(params).__name__}")
        if params.d_proj > self.dim:
            raise InvalidArgument(
                f"cannot project to a higher dimensionality (d_proj={params.d_proj} > "
                f"dim={self.dim}); choose d_proj <= {self.dim}"
            )
        self.params = params
        p = params
        self.fde_dim: int = p.d_final if p.d_final is not None else p.concat_dim

        rng = np.random.default_rng(p.seed)
        # One draw of (r_reps, dim, k_sim) yields the same stream as fastembed's r_reps draws
        # of (dim, k_sim); then its +-1 matrices, drawn even when unused, to keep the stream.
        hyperplanes = rng.normal(size=(p.r_reps, self.dim, p.k_sim))
        signs = rng.choice(np.array([-1, 1]), size=(p.r_reps, self.dim, p.d_proj))
        # (dim, r_reps * k_sim) float64: column r * k_sim + j is hyperplane j of repetition r.
        self._hyperplanes = np.ascontiguousarray(hyperplanes.transpose(1, 0, 2)).reshape(
            self.dim, p.r_reps * p.k_sim
        )
        self._bit_values = np.left_shift(1, np.arange(p.k_sim), dtype=np.int64)  # (k_sim,)
        # (dim, d_proj * r_reps) float64, column j * r_reps + r: coordinate j of repetition r;
        # None when d_proj == dim (buckets kept unprojected, as fastembed does).
        self._projection: npt.NDArray[np.float64] | None = None
        if p.d_proj < self.dim:
            scaled = signs.transpose(1, 2, 0).reshape(self.dim, p.d_proj * p.r_reps)
            self._projection = np.ascontiguousarray(scaled / np.sqrt(p.d_proj))
        # (concat_dim, d_final) float32 +-1/sqrt(d_final), drawn after fastembed's matrices.
        self._final: Float32Array | None = None
        if p.d_final is not None:
            bits = rng.integers(0, 2, size=(p.concat_dim, p.d_final), dtype=np.int8)
            self._final = (bits * np.float32(2) - np.float32(1)) / np.float32(np.sqrt(p.d_final))
        # (2**k_sim, 2**k_sim) uint8: Hamming distance between bucket ids, popcount of their xor.
        ids = np.arange(p.buckets)
        bits_of = (ids[:, None] >> np.arange(max(p.k_sim, 1))) & 1
        self._hamming = (bits_of[:, None, :] != bits_of[None, :, :]).sum(axis=2).astype(np.uint8)

    def __repr__(self) -> str:
        return f"FDEEncoder(dim={self.dim}, params={self.params!r})"

    def encode_documents(self, sets: VectorSets) -> Float32Array:
        """Encode documents: bucket averages, empty buckets filled.

        Args:
            sets: ``n >= 1`` vector sets, each ``(m_i, dim)`` with ``m_i >= 1``, any real dtype
                (a ``(n, m, dim)`` array is ``n`` sets of ``m`` vectors).

        Returns:
            ``(n, fde_dim)`` float32.

        Raises:
            EmptyBatch: no sets, or a set without vectors.
            DimensionMismatch: a set is not ``(m, dim)``.
            InvalidVector: a set holds NaN or inf, or is not real numbers.
        """
        return self._encode(sets, document=True)

    def encode_queries(self, sets: VectorSets) -> Float32Array:
        """Encode queries: bucket sums, empty buckets left zero.

        Shapes and errors as :meth:`encode_documents`; returns ``(n, fde_dim)`` float32.
        """
        return self._encode(sets, document=False)

    def encode_document(self, vectors: VectorSet) -> Float32Array:
        """Encode one document ``(m, dim)``; returns ``(fde_dim,)`` float32."""
        return self._encode([vectors], document=True).reshape(self.fde_dim)

    def encode_query(self, vectors: VectorSet) -> Float32Array:
        """Encode one query ``(m, dim)``; returns ``(fde_dim,)`` float32."""
        return self._encode([vectors], document=False).reshape(self.fde_dim)

    def _encode(self, sets: VectorSets, *, document: bool) -> Float32Array:
        """Validate, then encode in chunks that bound the working memory."""
        kind = "document" if document else "query"
        arrays = _as_vector_sets(sets, dim=self.dim, kind=kind)
        out = np.empty((len(arrays), self.fde_dim), dtype=np.float32)
        p = self.params
        max_sets = max(1, _CHUNK_CELLS // (p.r_reps * p.buckets * max(p.buckets, p.d_proj)))
        for start, stop in _chunks(arrays, max_tokens=_CHUNK_TOKENS, max_sets=max_sets):
            chunk = arrays[start:stop]
            lengths = np.fromiter((len(a) for a in chunk), np.int64, stop - start)
            # float64, as fastembed: in float32 a rounding error can flip a SimHash sign (a vector
            # moves to another bucket) and long sums drift past 1e-5 of fastembed's. float32
            # would be ~1.6x faster, but the text model spends far more per token anyway.
            tokens = np.concatenate(chunk, axis=0, dtype=np.float64)  # (t, dim)
            _check_finite(tokens, lengths, start, kind=kind)
            bucket = self._buckets(tokens)
            concat = self._pool(tokens, bucket, lengths, document=document)
            if self._final is not None:
                out[start:stop] = concat.astype(np.float32) @ self._final
            else:
                out[start:stop] = concat
        return out

    def _buckets(self, tokens: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """SimHash bucket ids ``(t, r_reps)`` int64 of ``tokens (t, dim)`` float64."""
        p = self.params
        n_tokens = len(tokens)
        if p.k_sim == 0:
            return np.zeros((n_tokens, p.r_reps), dtype=np.int64)
        above = (tokens @ self._hyperplanes > 0).reshape(n_tokens, p.r_reps, p.k_sim)
        bucket: npt.NDArray[np.int64] = np.matmul(above, self._bit_values, dtype=np.int64)
        return bucket

    def _pool(
        self,
        tokens: npt.NDArray[np.float64],
        bucket: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        *,
        document: bool,
    ) -> npt.NDArray[np.float64]:
        """Bucket sums or averages of ``n`` sets, projected: ``(n, concat_dim)`` float64.

        ``tokens (t, dim)`` float64 are the sets' vectors back to back, ``bucket (t, r_reps)``
        their bucket ids, ``lengths (n,)`` the sizes of the sets.
        """
        p = self.params
        n, n_tokens = len(lengths), len(tokens)
        reps, n_buckets, d_proj = p.r_reps, p.buckets, p.d_proj
        # Projection is linear: summing projected vectors equals projecting their sum, and the
        # projected vectors are fewer numbers to sum (r_reps * d_proj per token, not dim per cell).
        # (d_proj, r_reps, t): coordinate j of token t in repetition r, contiguous along t.
        projected: npt.NDArray[np.float64]
        if self._projection is not None:
            projected = (self._projection.T @ tokens.T).reshape(d_proj, reps, n_tokens)
        else:
            projected = np.broadcast_to(tokens.T[:, None, :], (d_proj, reps, n_tokens))
        # Cell (set, repetition, bucket) of every (repetition, token), numbered in output order.
        set_of_token = np.repeat(np.arange(n, dtype=np.int64), lengths)
        cell = ((set_of_token * reps + np.arange(reps)[:, None]) * n_buckets + bucket.T).ravel()
        n_cells = n * reps * n_buckets

        counts = np.bincount(cell, minlength=n_cells)
        centers = np.empty((n_cells, d_proj), dtype=np.float64)
        for j in range(d_proj):  # over output coordinates, not tokens; sums in float64
            centers[:, j] = np.bincount(cell, weights=projected[j].ravel(), minlength=n_cells)
        if document:
            empty = counts == 0
            np.divide(centers, counts[:, None], out=centers, where=~empty[:, None])
            if empty.any():
                # Lowest r * t_total + t of every cell, that is its first token.
                first = np.full(n_cells, reps * n_tokens, dtype=np.int64)
                np.minimum.at(first, cell, np.arange(reps * n_tokens, dtype=np.int64))
                self._fill_empty(centers, projected, empty, first)
        return centers.reshape(n, reps * n_buckets * d_proj)

    def _fill_empty(
        self,
        centers: npt.NDArray[np.float64],
        projected: npt.NDArray[np.float64],
        empty: npt.NDArray[np.bool_],
        first: npt.NDArray[np.int64],
    ) -> None:
        """Give each empty cell the first vector of the nearest occupied bucket, in place.

        ``centers (cells, d_proj)``; ``projected (d_proj, r_reps, t)``; ``empty (cells,)``;
        ``first (cells,)``: ``r * t + token`` of each occupied cell's first token.
        """
        n_buckets = self.params.buckets
        empty_by_set_rep = empty.reshape(-1, n_buckets)  # (n * r_reps, buckets)
        all_set_rep, all_buckets = np.nonzero(empty_by_set_rep)
        block = max(1, _CHUNK_CELLS // n_buckets)  # empty cells per (cells, buckets) table
        for start in range(0, len(all_set_rep), block):
            set_rep = all_set_rep[start : start + block]
            buckets = all_buckets[start : start + block]
            # Every set has a vector, so every (set, repetition) has an occupied bucket.
            hamming = self._hamming[buckets]  # (cells, buckets)
            distance = np.where(empty_by_set_rep[set_rep], np.uint8(255), hamming)
            nearest = np.argmin(distance, axis=1)  # lowest bucket id among ties, as fastembed
            rep, token = np.divmod(first[set_rep * n_buckets + nearest], projected.shape[2])
            centers[set_rep * n_buckets + buckets] = projected[:, rep, token].T


def chamfer(query: VectorSet, docs: Sequence[VectorSet]) -> Float32Array:
    """Chamfer (MaxSim) similarity ``sum_q max_p <q, p>`` of one query with each document.

    Args:
        query: ``(m, dim)`` query vectors, ``m >= 1``.
        docs: vector sets ``(m_i, dim)``, ``m_i >= 1``; an empty sequence gives ``(0,)``.

    Returns:
        ``(len(docs),)`` float32, computed in float32.

    Raises:
        EmptyBatch, DimensionMismatch, InvalidVector: as :meth:`FDEEncoder.encode_documents`.
    """
    q = _as_vector_set(query, dim=None, kind="query", label="query").astype(np.float32)
    if not np.isfinite(q).all():
        raise InvalidVector("query contains NaN or inf: every query vector must be finite")
    if isinstance(docs, Sequence | np.ndarray) and len(docs) == 0:
        return np.zeros(0, dtype=np.float32)
    arrays = _as_vector_sets(docs, dim=q.shape[1], kind="document", label="document")
    scores = np.empty(len(arrays), dtype=np.float32)
    for start, stop in _chunks(arrays, max_tokens=4 * _CHUNK_TOKENS, max_sets=len(arrays)):
        lengths = np.fromiter((len(a) for a in arrays[start:stop]), np.int64, stop - start)
        tokens = np.concatenate(arrays[start:stop], axis=0, dtype=np.float32)  # (t, dim)
        _check_finite(tokens, lengths, start, kind="document", label="document")
        similarity = q @ tokens.T  # (m, t)
        starts = np.cumsum(lengths) - lengths
        scores[start:stop] = np.maximum.reduceat(similarity, starts, axis=1).sum(axis=0)
    return scores


def _as_vector_sets(
    sets: VectorSets, *, dim: int, kind: str, label: str = "vector set"
) -> list[npt.NDArray[Any]]:
    """Check every set of ``sets`` with :func:`_as_vector_set`; returns them as arrays."""
    if isinstance(sets, np.ndarray) and sets.ndim != 3:
        raise InvalidArgument(
            f"expected a sequence of (m, {dim}) vector sets or one (n, m, {dim}) array, got an "
            f"array of shape {sets.shape}; for a single set use encode_{kind}"
        )
    if isinstance(sets, str | bytes) or not isinstance(sets, Sequence | np.ndarray):
        raise InvalidArgument(
            f"expected a sequence of (m, {dim}) vector sets, got {type(sets).__name__}"
        )
    if len(sets) == 0:
        raise EmptyBatch(f"no vector sets to encode: pass at least one (m, {dim}) {kind}")
    # A loop over sets, never over vectors.
    return [
        _as_vector_set(vectors, dim=dim, kind=kind, label=f"{label} {i}")
        for i, vectors in enumerate(sets)
    ]


def _as_vector_set(
    vectors: VectorSet, *, dim: int | None, kind: str, label: str
) -> npt.NDArray[Any]:
    """``vectors`` as an ``(m, dim)`` real array, ``m >= 1``, uncopied when already one.

    ``dim=None`` accepts any dimension. NaN and inf are checked later, on the concatenation.
    """
    try:
        a = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    except ValueError as exc:  # ragged nested lists
        raise DimensionMismatch(
            f"{label} is ragged: its vectors must all have the same dimension"
            + (f" ({dim})" if dim is not None else "")
        ) from exc
    expected = "dim" if dim is None else str(dim)
    if a.size == 0 and a.ndim <= 2:
        raise EmptyBatch(f"{label} is empty: a {kind} needs at least one vector")
    if a.ndim != 2:
        raise DimensionMismatch(
            f"{label} has shape {a.shape}; expected a 2-D array (n_vectors, {expected})"
        )
    if dim is not None and a.shape[1] != dim:
        raise DimensionMismatch(f"{label} has dimension {a.shape[1]}, expected {dim}")
    if a.dtype.kind not in "fiu":
        raise InvalidVector(
            f"{label} has dtype {a.dtype}; expected real numbers (float32 or float64)"
        )
    return a


def _check_finite(
    tokens: npt.NDArray[np.floating[Any]],
    lengths: npt.NDArray[np.int64],
    first: int,
    *,
    kind: str,
    label: str = "vector set",
) -> None:
    """Raise InvalidVector naming the set with the first NaN or inf in ``tokens (t, dim)``,
    the vectors of sets ``first, first + 1, ...`` of sizes ``lengths`` back to back."""
    finite = np.isfinite(tokens).all(axis=1)
    if finite.all():
        return
    index = first + int(np.searchsorted(np.cumsum(lengths), np.argmin(finite), side="right"))
    raise InvalidVector(f"{label} {index} contains NaN or inf: every {kind} vector must be finite")


def _chunks(
    arrays: Sequence[npt.NDArray[Any]], *, max_tokens: int, max_sets: int
) -> Iterator[tuple[int, int]]:
    """Split ``arrays`` into ``[start, stop)`` runs of at most ``max_sets`` sets and about
    ``max_tokens`` vectors (a single larger set forms a run of its own)."""
    start, tokens = 0, 0
    for i, a in enumerate(arrays):
        if i > start and (tokens + len(a) > max_tokens or i - start >= max_sets):
            yield start, i
            start, tokens = i, 0
        tokens += len(a)
    yield start, len(arrays)
