"""Every bad input raises a typed error that says what to fix, and nothing is written."""

from __future__ import annotations

import numpy as np
import pytest

from index import Collection, CollectionConfig, errors

DIM = 8


@pytest.fixture
def col(tmp_path):
    c = Collection.create(tmp_path / "c", CollectionConfig(dim=DIM))
    c.upsert(["keep"], np.ones((1, DIM), np.float32), [{"a": 1}])
    yield c
    c.close()


def vecs(n: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    ("ids", "vectors", "payloads", "error", "says"),
    [
        (["a"], vecs(1, DIM + 1), None, errors.DimensionMismatch, "dimension 9"),
        (["a", "b"], vecs(3), None, errors.DimensionMismatch, "one vector per id"),
        (["a"], np.full((1, DIM), np.nan, np.float32), None, errors.InvalidVector, "NaN or inf"),
        (["a", "b"], np.vstack([vecs(1), np.full((1, DIM), np.inf)]), None, errors.InvalidVector, r"vectors\[1\]"),
        (["a"], np.zeros((1, DIM)), None, errors.InvalidVector, "all zeros"),
        ([], np.empty((0, DIM)), None, errors.EmptyBatch, "empty"),
        (["a", "a"], vecs(2), None, errors.DuplicateId, "appears twice"),
        ([-1], vecs(1), None, errors.InvalidId, "non-negative"),
        ([1.5], vecs(1), None, errors.InvalidId, "float"),
        ([True], vecs(1), None, errors.InvalidId, "bool"),
        ([""], vecs(1), None, errors.InvalidId, "1 to 512"),
        (["a"], vecs(1), ["not an object"], errors.InvalidPayload, "JSON object"),
        (["a"], vecs(1), [{"x": float("nan")}], errors.InvalidPayload, "JSON-serialisable"),
        (["a"], vecs(1), [{"x": object()}], errors.InvalidPayload, "JSON-serialisable"),
        (["a", "b"], vecs(2), [{}], errors.InvalidPayload, "one entry per id"),
        (["a"], [["x"] * DIM], None, errors.InvalidVector, "numbers"),
    ],
)
def test_bad_upsert_writes_nothing(col, ids, vectors, payloads, error, says):
    disk_before = col.stats().disk_bytes
    with pytest.raises(error, match=says):
        col.upsert(ids, vectors, payloads)
    assert col.count() == 1
    assert col.get("a") is None
    assert col.stats().disk_bytes == disk_before
    assert isinstance(error("x"), errors.InvalidInput)


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"k": 0}, errors.InvalidArgument, "k must be an integer >= 1"),
        ({"k": 2.5}, errors.InvalidArgument, "k must be"),
        ({"oversampling": -1}, errors.InvalidArgument, "oversampling"),
        ({"filter": "lang=en"}, errors.InvalidFilter, "must be an object"),
        ({"filter": {"where": []}}, errors.InvalidFilter, "unknown filter clause 'where'"),
        ({"filter": {"must": [{"key": "a", "gt": 3}]}}, errors.InvalidFilter, "unknown operator 'gt'"),
        ({"filter": {"must": [{"key": "a"}]}}, errors.InvalidFilter, "exactly one operator"),
        ({"filter": {"must": [{"match": 1}]}}, errors.InvalidFilter, "needs a 'key'"),
        ({"filter": {"must": [{"key": "a';--", "match": 1}]}}, errors.InvalidFilter, "needs a 'key'"),
        ({"filter": {"must": [{"key": "a", "any": []}]}}, errors.InvalidFilter, "1 to 1000 values"),
        ({"filter": {"must": [{"key": "a", "match": [1]}]}}, errors.InvalidFilter, "strings, numbers or booleans"),
        ({"filter": {"must": {"key": "a", "match": 1}}}, errors.InvalidFilter, "must be a list"),
    ],
)
def test_bad_search_arguments(col, kwargs, error, says):
    with pytest.raises(error, match=says):
        col.search(vecs(1), **{"k": 3, **kwargs})


def test_bad_queries(col):
    with pytest.raises(errors.DimensionMismatch, match="dimension 4"):
        col.search(vecs(1, 4))
    with pytest.raises(errors.InvalidVector, match="queries"):
        col.search(np.full(DIM, np.nan))
    with pytest.raises(errors.DimensionMismatch):
        col.search(np.zeros((2, 2, DIM)))


def test_bad_ids_for_delete_and_get(col):
    with pytest.raises(errors.InvalidId):
        col.delete([None])
    with pytest.raises(errors.EmptyBatch):
        col.delete([])
    with pytest.raises(errors.InvalidId):
        col.get(-3)
    assert col.count() == 1


def test_create_and_open_errors(tmp_path):
    with pytest.raises(errors.CollectionNotFound, match="create it first"):
        Collection.open(tmp_path / "missing")
    Collection.create(tmp_path / "c", CollectionConfig(dim=4)).close()
    with pytest.raises(errors.CollectionExists):
        Collection.create(tmp_path / "c", CollectionConfig(dim=4))
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        CollectionConfig(dim=0)
    with pytest.raises(ValueError, match="coarse"):
        CollectionConfig(dim=4, coarse="hnsw")


@pytest.mark.parametrize(
    "fields", [{"coarse": "binary", "bits": 2}, {"coarse": "pq", "nprobe": 8}, {"multivector": {}, "bits": 4}]
)
def test_ivf_options_on_another_coarse_stage_are_refused(fields):
    with pytest.raises(ValueError, match="set coarse to 'ivf'"):
        CollectionConfig(dim=4, **fields)
    CollectionConfig(dim=4, bits=fields.get("bits", 1), nprobe=fields.get("nprobe"))  # fine with ivf


def test_ivf_bits_must_be_1_2_or_4():
    with pytest.raises(ValueError, match="bits"):
        CollectionConfig(dim=4, bits=3)
