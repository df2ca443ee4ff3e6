"""The sparse (BM25) stage and hybrid search in the library: scores against a reference BM25,
consistency through upsert / replace / delete / compaction / reopen, a crash between the
catalog's commit and the stage's, filters, modes and bad combinations. Real tantivy, SQLite."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from index import Collection, CollectionConfig
from index.coarse.sparse import SparseStage
from index.collection import RRF_K, convex, rrf
from index.errors import InvalidArgument
from index.row_sets import Allowed

# Words the analyzer keeps as they are (no stop words, no stems to strip), so that the reference
# can split on spaces.
DOCS = ["cat dog", "cat cat fish", "dog bird fish fish fish", "bird", "cat dog bird fish owl"]


def reference_bm25(docs: list[str], query: str, k1: float = 1.2, b: float = 0.75) -> list[tuple[int, float]]:
    """BM25 as Robertson et al. define it, with Lucene's idf: ln(1 + (N - df + 0.5) / (df + 0.5))."""
    tokens = [d.split() for d in docs]
    n, avgdl = len(tokens), sum(map(len, tokens)) / len(tokens)
    scored = []
    for i, words in enumerate(tokens):
        score = 0.0
        for term in set(query.split()):
            tf, df = words.count(term), sum(term in t for t in tokens)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(words) / avgdl))
        if score > 0:
            scored.append((i, score))
    return sorted(scored, key=lambda x: (-x[1], x[0]))


@pytest.mark.parametrize("query", ["cat", "fish bird", "owl cat", "dog fish bird cat"])
def test_bm25_scores_and_ranking_equal_the_reference(tmp_path: Path, query: str) -> None:
    stage = SparseStage(tmp_path / "s")
    stage.write(0, DOCS)
    rows, scores = stage.candidates(query, 10, allowed=None)
    expected = reference_bm25(DOCS, query)
    assert rows.tolist() == [i for i, _ in expected]
    np.testing.assert_allclose(scores, [s for _, s in expected], rtol=1e-5)


def test_analysis_stems_lowercases_and_drops_stop_words_and_query_syntax(tmp_path: Path) -> None:
    stage = SparseStage(tmp_path / "s")
    stage.write(0, ["The Running of the Cats", "a dog ran", "quantum:chromodynamics (QCD)"])
    assert stage.candidates("runs CAT", 5, allowed=None)[0].tolist() == [0]  # stemmed, lowercased
    assert len(stage.candidates("the of a", 5, allowed=None)[0]) == 0  # stop words only
    assert stage.candidates('quantum AND "qcd" -field:x', 5, allowed=None)[0].tolist() == [2]  # words only
    assert len(stage.candidates(")(:*", 5, allowed=None)[0]) == 0


def test_allowed_rows_filter_inside_and_after_tantivy(tmp_path: Path) -> None:
    stage = SparseStage(tmp_path / "s")
    texts = [f"common word{i % 7}" for i in range(200)]
    stage.write(0, texts)
    mask = np.zeros(200, dtype=bool)
    mask[::3] = True
    for allowed in (Allowed.of_mask(mask, int(mask.sum())),  # the live rows: filtered after
                    Allowed.of_bitmap(__import__("pyroaring").BitMap(np.flatnonzero(mask).tolist()), 200)):
        rows, _ = stage.candidates("common", 500, allowed=allowed)
        assert sorted(rows.tolist()) == np.flatnonzero(mask).tolist()
        rows, _ = stage.candidates("word3", 500, allowed=allowed)
        assert sorted(rows.tolist()) == [i for i in range(0, 200, 3) if i % 7 == 3]


def test_convex() -> None:
    # dense 0.9 / 0.5 / 0.1 -> 1, 0.5, 0; BM25 of rows 6 and 8: 4 and 2 (8 not a candidate) -> row 6: 1, else 0
    rows, scores = convex(np.array([5, 6, 7]), np.array([0.9, 0.5, 0.1]), np.array([6, 8]), np.array([4.0, 2.0]), 3)
    assert rows.tolist() == [6, 5, 7] and scores.tolist() == pytest.approx([0.75, 0.5, 0.0])


def test_rrf() -> None:
    rows, scores = rrf(np.array([5, 6, 7]), np.array([7, 8]), 3)
    assert rows.tolist() == [7, 5, 6]  # 7: 1/63 + 1/61; 5: 1/61; 6: 1/62; 8: 1/62 (6 before 8: row order)
    assert scores[0] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))


def _unit(rng: np.random.Generator, n: int, dim: int = 8) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _matching(current: dict[int, str | None], word: str) -> set[int]:
    return {i for i, t in current.items() if t is not None and word in t.split()}


def test_sparse_stage_follows_upsert_replace_delete_compaction_and_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(30)]
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=8, sparse=True))
    current: dict[int, str | None] = {}

    def check() -> None:
        for word in words[:10]:
            hits = col.search(None, 1000, text=word, mode="sparse")[0]
            assert {h.id for h in hits} == _matching(current, word), word

    for step in range(12):
        ids = rng.choice(300, size=40, replace=False).tolist()
        texts = [None if rng.random() < 0.2 else " ".join(rng.choice(words, 4)) for _ in ids]
        col.upsert(ids, _unit(rng, len(ids)), texts=texts)
        current.update(zip(ids, texts, strict=True))
        if step % 3 == 2:
            gone = rng.choice(sorted(current), size=15, replace=False).tolist()
            col.delete(gone)
            for i in gone:
                current.pop(i)
        check()
    point = col.get(next(i for i, t in current.items() if t is not None))
    assert point is not None and point.text == current[point.id]
    col.compact()
    check()
    col.close()
    col = Collection.open(tmp_path / "c")
    check()
    col.close()


def test_rows_the_sparse_stage_missed_are_caught_up_on_open(tmp_path: Path) -> None:
    """A crash between the catalog's commit (durable, acknowledged) and the stage's: simulated by
    putting back an older copy of the stage's files; open re-adds what it lacks."""
    rng = np.random.default_rng(4)
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=8, sparse=True))
    col.upsert([1, 2], _unit(rng, 2), texts=["alpha beta", "beta gamma"])
    col.close()
    shutil.copytree(tmp_path / "c" / "sparse.0", tmp_path / "older")
    col = Collection.open(tmp_path / "c")
    col.upsert([3, 4], _unit(rng, 2), texts=["gamma delta", None])
    col.upsert([1], _unit(rng, 1), texts=["epsilon"])  # replaces 1
    col.close()
    shutil.rmtree(tmp_path / "c" / "sparse.0")
    shutil.copytree(tmp_path / "older", tmp_path / "c" / "sparse.0")
    col = Collection.open(tmp_path / "c")
    assert {h.id for h in col.search(None, 10, text="gamma", mode="sparse")[0]} == {2, 3}
    assert {h.id for h in col.search(None, 10, text="epsilon", mode="sparse")[0]} == {1}
    assert {h.id for h in col.search(None, 10, text="alpha", mode="sparse")[0]} == set()  # 1 was replaced
    col.close()


def test_hybrid_fuses_dense_and_lexical_rankings_under_filters(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n = 400
    vectors = _unit(rng, n)
    texts = [f"topic{i % 10} filler{i % 3}" for i in range(n)]
    payloads = [{"g": i % 4} for i in range(n)]
    col = Collection.create(tmp_path / "c", CollectionConfig(dim=8, sparse=True, coarse="flat"))
    col.upsert(list(range(n)), vectors, payloads, texts=texts)
    q = vectors[7] + 0.01
    q = q / np.linalg.norm(q)
    result = col.search_detailed(q, 10, text="topic3")
    assert result.mode == "hybrid" and result.sparse_s > 0
    # the reference: exact dense ranking over the union of both candidate sets, fused with BM25's
    k_candidates = 10 * 1  # flat: oversampling 1, so 10 candidates a side
    dense_order = np.argsort(-(vectors @ q), kind="stable")[:k_candidates]
    lexical = [i for i in range(n) if i % 10 == 3]  # equal BM25 scores: tantivy breaks ties by row
    lexical_rows, _ = col._sparse.candidates("topic3", k_candidates, allowed=None)  # type: ignore[union-attr]
    assert set(lexical_rows.tolist()) <= set(lexical)
    lexical_rows, bm25 = col._sparse.candidates("topic3", k_candidates, allowed=None)  # type: ignore[union-attr]
    union = np.union1d(dense_order, lexical_rows)
    union_ranked = union[np.argsort(-(vectors[union] @ q), kind="stable")]
    expected, _ = convex(union_ranked, vectors[union_ranked] @ q, lexical_rows, bm25, 10)
    assert [h.id for h in result.hits[0]] == expected.tolist()
    expected, _ = rrf(union_ranked, lexical_rows, 10)
    assert [h.id for h in col.search(q, 10, text="topic3", fusion="rrf")[0]] == expected.tolist()
    flt = {"must": [{"key": "g", "match": 1}]}
    hits = col.search(q, 50, text="topic5", filter=flt)[0]
    assert hits and all(payloads[h.id]["g"] == 1 for h in hits)
    assert {h.id for h in col.search(None, 200, text="topic5", filter=flt)[0]} == {
        i for i in range(n) if i % 10 == 5 and i % 4 == 1}
    col.close()


def test_modes_and_bad_combinations(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    dense_only = Collection.create(tmp_path / "d", CollectionConfig(dim=8))
    dense_only.upsert([1], _unit(rng, 1), texts=["kept anyway"])
    assert dense_only.get(1).text == "kept anyway"  # type: ignore[union-attr]
    assert dense_only.search_detailed(_unit(rng, 1), 1, text="kept").mode == "dense"  # no sparse stage
    with pytest.raises(InvalidArgument, match="needs a sparse stage"):
        dense_only.search(_unit(rng, 1), 1, text="kept", mode="hybrid")
    with pytest.raises(InvalidArgument, match="texts must be a list of 1"):
        dense_only.upsert([2], _unit(rng, 1), texts=["a", "b"])
    assert dense_only.count() == 1  # nothing written
    dense_only.close()
    col = Collection.create(tmp_path / "s", CollectionConfig(dim=8, coarse="sparse"))
    col.upsert([1, 2], _unit(rng, 2), texts=["red apple", "green apple"])
    assert col.search_detailed(None, 2, text="apple").mode == "sparse"
    assert col.search_detailed(_unit(rng, 1), 2, text="apple").mode == "hybrid"
    assert col.search_detailed(_unit(rng, 1), 2).mode == "dense"
    with pytest.raises(InvalidArgument, match="give a text query"):
        col.search(_unit(rng, 1), 2, mode="sparse")
    with pytest.raises(InvalidArgument, match="needs a query vector"):
        col.search(None, 2, text="apple", mode="hybrid")
    with pytest.raises(InvalidArgument, match="one text per query"):
        col.search(_unit(rng, 2), 2, text=["apple"], mode="hybrid")
    col.close()
    with pytest.raises(ValueError, match="not available for multi-vector"):
        CollectionConfig(dim=8, sparse=True, multivector={})


SPARSE_WRITER = """
import sys, numpy as np
from index import Collection, CollectionConfig
col = Collection.create(sys.argv[1], CollectionConfig(dim=8, coarse="flat", sparse=True))
for b in range(1000):
    rng = np.random.default_rng(b)
    print("begin", b, flush=True)
    col.upsert([f"{b}-{i}" for i in range(2000)], rng.standard_normal((2000, 8)).astype(np.float32),
               texts=[f"batch{b} item{i} common" for i in range(2000)])
    print("done", b, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.08])
def test_sigkill_keeps_every_acknowledged_text_searchable(tmp_path: Path, delay: float) -> None:
    """A real SIGKILL at random moments of a writer: every batch whose upsert returned is found by
    BM25 after reopening (the catalog's commit and the stage's are caught up), and a batch is
    found whole or not at all."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", SPARSE_WRITER, str(tmp_path / "c")], stdout=subprocess.PIPE,
                            text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    done: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        word, b = line.split()
        if word == "done":
            done.append(int(b))
        elif word == "begin" and int(b) == 3:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    done += [int(line.split()[1]) for line in proc.stdout if line.startswith("done")]  # printed before the kill
    proc.wait()
    assert done == list(range(len(done))) and len(done) >= 3
    col = Collection.open(tmp_path / "c")
    n = col.count()
    assert n in (2000 * len(done), 2000 * (len(done) + 1))  # the batch in flight: whole or absent
    for b in range(n // 2000):
        found = {h.id for h in col.search(None, 5000, text=f"batch{b}", mode="sparse")[0]}
        assert found == {f"{b}-{i}" for i in range(2000)}, b
    assert len(col.search(None, 10_000, text="common", mode="sparse")[0]) == min(n, 10_000)
    col.close()
