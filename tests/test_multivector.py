"""Multi-vector collections: FDE proxies in the coarse stage, exact Chamfer rerank from disk."""

from __future__ import annotations

import numpy as np
import pytest

from index import Collection, CollectionConfig, MultiVectorConfig, collection, errors
from index.fde import chamfer

DIM = 32
N = 800


def topic_sets(n: int, *, seed: int, topics: int = 30) -> list[np.ndarray]:
    """Documents as sets of 4-40 unit vectors drawn around a few of many shared topics."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((topics, DIM))
    out = []
    for _ in range(n):
        chosen = centers[rng.choice(topics, size=3, replace=False)]
        m = int(rng.integers(4, 40))
        x = chosen[rng.integers(0, 3, m)] + 0.6 * rng.standard_normal((m, DIM))
        out.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return out


@pytest.fixture(autouse=True)
def two_stages(monkeypatch):
    """These collections are small enough to be scanned exactly; the two stages are under test."""
    monkeypatch.setattr(collection, "MULTIVECTOR_EXACT_POINTS", 0)


@pytest.fixture(scope="module")
def corpus():
    docs = topic_sets(N, seed=1)
    queries = [d[: max(2, len(d) // 4)] + 0.05 for d in topic_sets(40, seed=2)]
    queries = [(q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32) for q in queries]
    return docs, queries


def brute_force(docs, query, k):
    return np.argsort(-chamfer(query, docs), kind="stable")[:k].tolist()


@pytest.mark.parametrize("coarse", ["binary", "pq", "flat"])
def test_fde_candidates_reranked_by_chamfer_find_the_true_top10(tmp_path, corpus, coarse):
    docs, queries = corpus
    config = CollectionConfig(dim=DIM, coarse=coarse, dtype="float16", multivector=MultiVectorConfig())
    with Collection.create(tmp_path / "c", config) as col:
        col.upsert(list(range(N)), docs, [{"i": i} for i in range(N)])
        hits = col.search(queries, 10, oversampling=30)
        recall = np.mean([
            len(set(brute_force(docs, q, 10)) & {h.id for h in found}) / 10
            for q, found in zip(queries, hits, strict=True)
        ])
        assert recall >= 0.95  # 300 of 800 candidates: measured 1.0 for binary
        exact = col.search(queries[0], 10, exact=True)[0]
        assert {h.id for h in exact} == set(brute_force(docs, queries[0], 10))  # float16 may swap ties
        expected = chamfer(queries[0], [docs[exact[0].id]])[0]
        assert exact[0].score == pytest.approx(float(expected), abs=2e-2)  # float16 storage


def test_multivector_persistence_delete_compact(tmp_path, corpus):
    docs, queries = corpus
    path = tmp_path / "c"
    with Collection.create(path, CollectionConfig(dim=DIM, multivector=MultiVectorConfig(r_reps=8))) as col:
        col.upsert(list(range(N)), docs)
        before = col.search(queries[:5], 10, oversampling=30)
    with Collection.open(path) as col:
        assert col.search(queries[:5], 10, oversampling=30) == before
        point = col.get(3)
        np.testing.assert_allclose(point.vector, docs[3], atol=1e-6)
        col.delete(list(range(0, N, 2)))
        col.compact()
        assert col.count() == N // 2
        np.testing.assert_allclose(col.get(3).vector, docs[3], atol=1e-6)
        found = col.search(queries, 10, exact=True)
        assert all(h.id % 2 == 1 for r in found for h in r)
        approx = col.search(queries, 10, oversampling=30)  # the coarse stage was rebuilt on the FDEs
        recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, found, strict=True)])
        assert recall >= 0.95
    with Collection.open(path) as col:
        np.testing.assert_allclose(col.get(N - 1).vector, docs[N - 1], atol=1e-6)
        assert col.search(queries, 10, exact=True) == found


@pytest.mark.parametrize(
    ("sets", "error", "says"),
    [
        ([np.ones((3, DIM)), np.ones((0, DIM))], errors.EmptyBatch, r"vectors\[1\] is an empty vector set"),
        ([[[1.0] * DIM, [1.0] * (DIM - 1)], np.ones((2, DIM))], errors.DimensionMismatch, "ragged"),
        ([np.ones((2, DIM)), np.ones((2, DIM + 1))], errors.DimensionMismatch, r"vectors\[1\] have dimension 33"),
        ([np.full((2, DIM), np.nan), np.ones((2, DIM))], errors.InvalidVector, "NaN or inf"),
        ([np.ones((65, DIM)), np.ones((2, DIM))], errors.InvalidArgument, "at most 64 per point"),
    ],
)
def test_bad_vector_sets_write_nothing(tmp_path, sets, error, says):
    config = CollectionConfig(dim=DIM, multivector=MultiVectorConfig(max_vectors=64))
    with Collection.create(tmp_path / "c", config) as col:
        col.upsert(["ok"], [np.ones((2, DIM))])
        disk = col.stats().disk_bytes
        with pytest.raises(error, match=says):
            col.upsert(["a", "b"], sets)
        assert col.count() == 1 and col.get("a") is None
        assert col.stats().disk_bytes == disk


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_maxsim_kernel_equals_numpy_chamfer(dtype):
    from index.maxsim import MaxSim

    docs = topic_sets(60, seed=5)
    query = topic_sets(1, seed=6)[0]
    stored = np.concatenate(docs).astype(dtype)
    sizes = np.array([len(d) for d in docs])
    expected = chamfer(query, [d.astype(dtype).astype(np.float32) for d in docs])
    got = MaxSim(DIM, dtype).scores(query, stored, sizes)
    assert got.dtype == np.float32 and got.shape == (60,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_chamfer_over_many_blocks_and_any_row_order(tmp_path, corpus):
    """Scores come back in the order asked, whatever way the rows are cut into blocks."""
    docs, queries = corpus
    with Collection.create(tmp_path / "c", CollectionConfig(dim=DIM, dtype="float32",
                                                           multivector=MultiVectorConfig())) as col:
        col.upsert(list(range(N)), docs)
        sets = col._sets
        rows = np.random.default_rng(3).permutation(N)[:500]
        blocks = list(sets.blocks(np.sort(rows), max_vectors=100))
        assert len(blocks) > 10 and np.array_equal(np.concatenate(blocks), np.sort(rows))
        assert all((sets.offsets[b + 1] - sets.offsets[b]).sum() <= 100 or len(b) == 1 for b in blocks)
        expected = chamfer(queries[0], [docs[r] for r in rows])
        np.testing.assert_allclose(sets.chamfer(queries[0], rows), expected, rtol=1e-5, atol=1e-5)


def test_small_multivector_collections_are_scanned_exactly(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(collection, "MULTIVECTOR_EXACT_POINTS", N)
    docs, queries = corpus
    with Collection.create(tmp_path / "c", CollectionConfig(dim=DIM, multivector=MultiVectorConfig())) as col:
        col.upsert(list(range(N)), docs)
        result = col.search_detailed(queries[:5], 10)
        assert result.candidates == N
        assert [[h.id for h in r] for r in result.hits] == [brute_force(docs, q, 10) for q in queries[:5]]
