"""Two-stage search against brute-force numpy, persistence, tombstones and compaction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index import Collection, CollectionConfig
from tests.synthetic import brute_force, embeddings, queries_near, recall_at_k

DIM = 64
N = 6000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    base = embeddings(N, DIM, seed=1)
    queries = queries_near(base, 200, seed=2)
    return base, queries


def fill(path: Path, config: CollectionConfig, base: np.ndarray, batch: int = 1000) -> Collection:
    col = Collection.create(path, config)
    for start in range(0, len(base), batch):
        ids = list(range(start, min(start + batch, len(base))))
        col.upsert(ids, base[start : start + batch], [{"n": i, "parity": i % 2} for i in ids])
    return col


@pytest.mark.parametrize(
    ("coarse", "oversampling", "floor"),
    [("binary", 10, 0.92), ("binary", 32, 0.99), ("pq", 20, 0.95), ("flat", None, 1.0), ("ivf", None, 1.0)],
)
def test_two_stage_recall_against_numpy(tmp_path, data, coarse, oversampling, floor):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, coarse=coarse), base) as col:
        truth = brute_force(base, queries, 10).tolist()
        found = [[h.id for h in hits] for hits in col.search(queries, 10, oversampling=oversampling)]
        assert recall_at_k(truth, found, 10) >= floor
        exact = [[h.id for h in hits] for hits in col.search(queries, 10, exact=True)]
        assert recall_at_k(truth, exact, 10) == 1.0


def test_more_oversampling_never_hurts_much(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, coarse="binary"), base) as col:
        truth = brute_force(base, queries, 10).tolist()
        recalls = [
            recall_at_k(truth, [[h.id for h in r] for r in col.search(queries, 10, oversampling=o)], 10)
            for o in (1, 4, 16)
        ]
        assert recalls[0] < recalls[2]
        assert recalls == sorted(recalls)


def test_scores_are_exact_cosine_and_sorted(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM), base) as col:
        q = queries[0] * 3.0  # cosine: the query's norm does not matter
        hits = col.search(q, 5)[0]
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        for h in hits:
            expected = float(base[h.id] @ queries[0] / np.linalg.norm(queries[0]))
            assert h.score == pytest.approx(expected, abs=1e-5)
        assert hits[0].payload == {"n": hits[0].id, "parity": hits[0].id % 2}


def test_dot_metric_and_float16_storage(tmp_path, data):
    base, queries = data
    raw = base * np.linspace(0.5, 2.0, len(base), dtype=np.float32)[:, None]
    config = CollectionConfig(dim=DIM, metric="dot", dtype="float16")
    with fill(tmp_path / "c", config, raw) as col:
        truth = brute_force(raw, queries, 10).tolist()
        found = [[h.id for h in hits] for hits in col.search(queries, 10, exact=True)]
        assert recall_at_k(truth, found, 10) >= 0.98  # float16 rounding may swap near-ties
        point = col.get(7)
        assert point is not None and point.vector.dtype == np.float32
        np.testing.assert_allclose(point.vector, raw[7], atol=2e-3)


def test_persistence_across_close_and_open(tmp_path, data):
    base, queries = data
    path = tmp_path / "c"
    with fill(path, CollectionConfig(dim=DIM), base) as col:
        before = col.search(queries[:20], 10)
        col.upsert(["late"], base[:1], [{"tag": "late"}])
    with Collection.open(path) as col:
        assert col.count() == N + 1
        assert col.search(queries[:20], 10) == before
        late = col.get("late")
        assert late is not None and late.payload == {"tag": "late"}
        np.testing.assert_allclose(late.vector, base[0], atol=1e-6)
        assert col.config == CollectionConfig(dim=DIM)


def test_ids_strings_and_ints_are_distinct(tmp_path, data):
    base, _ = data
    with Collection.create(tmp_path / "c", CollectionConfig(dim=DIM)) as col:
        col.upsert([7, "7"], base[:2], [{"kind": "int"}, {"kind": "str"}])
        assert col.count() == 2
        assert col.get(7).payload == {"kind": "int"}
        assert col.get("7").payload == {"kind": "str"}
        assert col.get(8) is None


def test_upsert_replaces_existing_id(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM), base) as col:
        target = queries[3] / np.linalg.norm(queries[3])
        col.upsert([5], target, [{"replaced": True}])
        assert col.count() == N
        hits = col.search(queries[3], 3)[0]
        assert hits[0].id == 5 and hits[0].payload == {"replaced": True}
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.id for h in hits].count(5) == 1


def test_tombstones_and_compaction(tmp_path, data):
    base, queries = data
    path = tmp_path / "c"
    with fill(path, CollectionConfig(dim=DIM), base) as col:
        removed = list(range(0, N, 3))
        assert col.delete(removed + ["never-existed"]) == len(removed)
        assert col.count() == N - len(removed)
        assert col.get(0) is None
        gone = set(removed)
        keep = np.array([i for i in range(N) if i not in gone])
        truth = keep[brute_force(base[keep], queries, 10)].tolist()
        before = [[h.id for h in r] for r in col.search(queries, 10, oversampling=16)]
        assert not gone & {i for r in before for i in r}
        assert recall_at_k(truth, before, 10) >= 0.97
        disk_before = col.stats().disk_bytes
        col.compact()
        assert col.count() == N - len(removed)
        assert col.stats().disk_bytes < disk_before
        after = [[h.id for h in r] for r in col.search(queries, 10, oversampling=16)]
        assert recall_at_k(truth, after, 10) >= 0.97
        assert col.get(1).payload == {"n": 1, "parity": 1}
    with Collection.open(path) as col:  # the compacted generation is what reopens
        assert col.count() == N - len(removed)
        assert [[h.id for h in r] for r in col.search(queries, 10, oversampling=16)] == after
        assert sorted(p.name for p in path.glob("vectors.*")) == ["vectors.1.f32"]


def test_pq_trains_once_large_enough(tmp_path):
    base = embeddings(12_000, DIM, seed=3)
    queries = queries_near(base, 100, seed=4)
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, coarse="pq"), base, batch=4000) as col:
        stats = col.stats()
        assert stats.ram_bytes / stats.points < 64 + 16  # 8 sub-quantizer bytes + id + shared tables
        truth = brute_force(base, queries, 10).tolist()
        found = [[h.id for h in r] for r in col.search(queries, 10)]
        assert recall_at_k(truth, found, 10) >= 0.95


def test_binary_coarse_ram_is_compact(tmp_path, data):
    base, _ = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, coarse="binary"), base) as col:
        stats = col.stats()
        # 64 dims -> 8 bytes of code + 1 byte of liveness (its buffer grows by 1/8), plus the mean
        assert stats.ram_bytes <= N * 9 + N // 8 + DIM * 4
        assert stats.disk_bytes >= N * DIM * 4


def test_search_detailed_reports_stages(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, coarse="binary", oversampling=5), base) as col:
        result = col.search_detailed(queries[:2], 10)
        assert result.candidates == 50
        assert result.coarse_s >= 0 and result.rerank_s >= 0
        assert len(result.hits) == 2 and all(len(h) == 10 for h in result.hits)


def test_k_larger_than_collection(tmp_path, data):
    base, queries = data
    with Collection.create(tmp_path / "c", CollectionConfig(dim=DIM)) as col:
        col.upsert(["a", "b", "c"], base[:3])
        assert len(col.search(queries[0], 10)[0]) == 3
        assert len(col.search(queries[0], 10, exact=True)[0]) == 3


def test_reads_from_short_lived_threads_reuse_catalog_connections(tmp_path):
    """Thread pools retire idle threads and start new ones: a read connection per thread would
    grow without bound (2 MB of page cache each once the catalog is large)."""
    import threading

    rng = np.random.default_rng(0)
    with Collection.create(tmp_path / "c", CollectionConfig(dim=8)) as col:
        col.upsert(list(range(500)), rng.standard_normal((500, 8)), [{"i": i} for i in range(500)])

        def reads() -> None:
            col.search(rng.standard_normal(8), 5, filter={"must": [{"key": "i", "any": [1, 2, 3]}]})
            assert col.get(7) is not None

        for _ in range(30):  # one after another: one connection serves them all
            t = threading.Thread(target=reads)
            t.start()
            t.join()
        assert col._catalog.read_connections == 1
        together = [threading.Thread(target=reads) for _ in range(6)]
        for t in together:
            t.start()
        for t in together:
            t.join()
        assert 1 <= col._catalog.read_connections <= 6
