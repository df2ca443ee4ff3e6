"""Payload filters: equality, membership, negation; k hits whenever k points match."""

from __future__ import annotations

import numpy as np
import pytest

from index import Collection, CollectionConfig
from tests.synthetic import brute_force, embeddings, queries_near, recall_at_k

DIM = 32
N = 12000
LANGS = ["en", "de", "fr", "ja"]


@pytest.fixture(scope="module")
def col(tmp_path_factory):
    base = embeddings(N, DIM, seed=5)
    payloads = [
        {"lang": LANGS[i % 4], "year": 2020 + i % 7, "draft": i % 5 == 0, "meta": {"src": "wiki" if i % 2 else "web"}}
        for i in range(N)
    ]
    payloads[17] = {"lang": "en"}  # missing keys never match
    c = Collection.create(tmp_path_factory.mktemp("f") / "c", CollectionConfig(dim=DIM))
    c.upsert(list(range(N)), base, payloads)
    yield c, base, payloads
    c.close()


def matching(payloads, predicate):
    return np.array([i for i, p in enumerate(payloads) if predicate(p)])


@pytest.mark.parametrize(
    ("spec", "predicate"),
    [
        ({"must": [{"key": "lang", "match": "en"}]}, lambda p: p.get("lang") == "en"),
        (
            {"must": [{"key": "lang", "match": "en"}, {"key": "year", "any": [2023, 2024]}]},
            lambda p: p.get("lang") == "en" and p.get("year") in (2023, 2024),
        ),
        ({"must_not": [{"key": "draft", "match": True}]}, lambda p: p.get("draft") is not True),
        ({"must": [{"key": "meta.src", "match": "wiki"}]}, lambda p: p.get("meta", {}).get("src") == "wiki"),
        (
            {"should": [{"key": "lang", "match": "ja"}, {"key": "year", "match": 2020}]},
            lambda p: p.get("lang") == "ja" or p.get("year") == 2020,
        ),
        ({"must": [{"key": "year", "match": 1}]}, lambda p: False),
    ],
)
def test_filter_returns_only_matching_points(col, spec, predicate):
    c, base, payloads = col
    allowed = matching(payloads, predicate)
    queries = queries_near(base, 30, seed=6)
    for exact in (False, True):
        results = c.search(queries, 10, filter=spec, exact=exact, oversampling=16)
        for hits in results:
            assert len(hits) == min(10, len(allowed))  # k hits whenever k points match
            assert all(predicate(payloads[h.id]) for h in hits)
    if len(allowed) >= 10:
        truth = allowed[brute_force(base[allowed], queries, 10)].tolist()
        found = [[h.id for h in r] for r in c.search(queries, 10, filter=spec, oversampling=32)]
        assert recall_at_k(truth, found, 10) >= 0.95


def test_bool_does_not_match_int(col):
    c, _, payloads = col
    hits = c.search(queries_near(col[1], 1, seed=7), 50, filter={"must": [{"key": "draft", "match": 1}]})
    assert hits == [[]]


def test_rare_filter_still_gives_k_hits(col):
    c, _, payloads = col
    spec = {"must": [{"key": "year", "any": [2026]}, {"key": "lang", "match": "ja"}]}
    allowed = matching(payloads, lambda p: p.get("year") == 2026 and p.get("lang") == "ja")
    assert 10 <= len(allowed) < 2048
    hits = c.search(queries_near(col[1], 1, seed=8), 10, filter=spec, oversampling=1)[0]
    assert len(hits) == 10
