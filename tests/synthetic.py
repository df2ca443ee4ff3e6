"""Seeded, structured vectors that behave like text embeddings: clusters on the unit sphere
with a shared offset (embeddings of one model share a mean direction) and anisotropic noise."""

from __future__ import annotations

import numpy as np


def embeddings(n: int, dim: int = 64, *, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """``(n, dim) float32``, L2-normalised."""
    rng = np.random.default_rng(seed)
    offset = rng.standard_normal(dim) * 0.8
    centers = rng.standard_normal((clusters, dim)) + offset
    scale = np.linspace(0.3, 1.0, dim)  # some directions vary more than others
    x = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)) * scale * 0.6
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def recall_at_k(truth: list[list[object]], found: list[list[object]], k: int) -> float:
    return float(np.mean([len(set(t[:k]) & set(f[:k])) / k for t, f in zip(truth, found, strict=True)]))


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row indices by inner product, numpy only (the reference)."""
    scores = queries @ base.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def queries_near(base: np.ndarray, n: int, *, seed: int, noise: float = 0.5) -> np.ndarray:
    """Queries drawn like the corpus: a corpus point moved by noise, ``(n, dim) float32``, unit norm.

    ``noise`` is relative to a unit vector; 0.5 puts the query's own point around rank 1-20.
    """
    rng = np.random.default_rng(seed)
    dim = base.shape[1]
    q = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, dim)) * noise / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32)
