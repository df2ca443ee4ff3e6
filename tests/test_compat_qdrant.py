"""tandem's Qdrant-compatible API (service/compat/qdrant.py), driven by the official
``qdrant-client`` from PyPI over REST, against a real server on loopback (tests/server.py)."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as m
from qdrant_client.http.exceptions import UnexpectedResponse

from tests.server import Server

pytestmark = pytest.mark.slow

DIM = 16
N = 200
API_KEY = "qdrant-compat-key-7"
COL = "qdrant_compat"  # unique on the session's shared server


def connect(server: Server, **kwargs: Any) -> QdrantClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "api key over an insecure connection": loopback
        return QdrantClient(url=server.url, prefix="qdrant", prefer_grpc=False, timeout=60, **kwargs)


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def payload(i: int) -> dict[str, Any]:
    p: dict[str, Any] = {"group": ["a", "b", "c"][i % 3], "year": 2000 + i % 20, "tags": ["x", "y"][: i % 3],
                         "at": f"2024-0{1 + i % 9}-01T00:00:00Z"}
    if i % 7 == 0:
        p["note"] = None
    return p


@pytest.fixture(scope="module")
def qc(server: Server) -> Any:
    client = connect(server)
    assert client.create_collection(
        COL, vectors_config=m.VectorParams(size=DIM, distance=m.Distance.COSINE),
        hnsw_config=m.HnswConfigDiff(m=16), optimizers_config=m.OptimizersConfigDiff(indexing_threshold=0),
        shard_number=1, on_disk_payload=True,  # accepted and ignored
    )
    x = unit(N, 1)
    ids: list[Any] = list(range(N - 20)) + [str(uuid.UUID(int=i)) for i in range(N - 20, N)]
    for start in range(0, N - 20, 60):  # the test server takes 64 points a request
        client.upsert(COL, points=[m.PointStruct(id=ids[i], vector=x[i].tolist(), payload=payload(i))
                                    for i in range(start, min(start + 60, N - 20))])
    client.upsert(COL, points=m.Batch(ids=ids[N - 20:], vectors=x[N - 20:].tolist(),
                                       payloads=[payload(i) for i in range(N - 20, N)]))
    yield client, x, ids
    client.close()


def test_collections(qc: Any) -> None:
    client, _, _ = qc
    assert client.collection_exists(COL) and not client.collection_exists("nope")
    assert COL in [c.name for c in client.get_collections().collections]
    info = client.get_collection(COL)
    assert info.points_count == N and info.config.params.vectors.size == DIM
    assert info.config.params.vectors.distance == m.Distance.COSINE
    with pytest.raises(UnexpectedResponse) as raised:
        client.create_collection(COL, vectors_config=m.VectorParams(size=DIM, distance=m.Distance.COSINE))
    assert raised.value.status_code == 409 and "already exists" in str(raised.value)
    for bad, says in (
        ({"text": m.VectorParams(size=4, distance=m.Distance.COSINE)}, "named vectors"),
        (m.VectorParams(size=4, distance=m.Distance.EUCLID), "Euclid"),
    ):
        with pytest.raises(UnexpectedResponse) as raised:
            client.create_collection("bad", vectors_config=bad)
        assert raised.value.status_code == 400 and says in str(raised.value)
    with pytest.raises(UnexpectedResponse) as raised:
        client.get_collection("nope")
    assert raised.value.status_code == 404
    assert client.create_collection("qdrant_tmp", vectors_config=m.VectorParams(size=4, distance=m.Distance.DOT))
    assert client.delete_collection("qdrant_tmp") and not client.collection_exists("qdrant_tmp")


def expected_ids(ids: list[Any], keep: Any) -> list[Any]:
    return [ids[i] for i in range(N) if keep(i, payload(i))]


FILTERS: list[tuple[m.Filter, Any]] = [
    (m.Filter(must=[m.FieldCondition(key="group", match=m.MatchValue(value="a"))]), lambda i, p: p["group"] == "a"),
    (m.Filter(must=[m.FieldCondition(key="group", match=m.MatchAny(any=["b", "c"]))]), lambda i, p: p["group"] != "a"),
    (m.Filter(must=[m.FieldCondition(key="group", match=m.MatchExcept(**{"except": ["a"]}))]),
     lambda i, p: p["group"] != "a"),
    (m.Filter(must=[m.FieldCondition(key="year", range=m.Range(gte=2005, lt=2010))]),
     lambda i, p: 2005 <= p["year"] < 2010),
    (m.Filter(must=[m.FieldCondition(key="at", range=m.DatetimeRange(gte="2024-05-01T00:00:00Z"))]),
     lambda i, p: p["at"] >= "2024-05-01"),
    (m.Filter(must=[m.IsEmptyCondition(is_empty=m.PayloadField(key="tags"))]), lambda i, p: not p["tags"]),
    (m.Filter(must=[m.IsNullCondition(is_null=m.PayloadField(key="note"))]), lambda i, p: "note" in p),
    (m.Filter(must=[m.HasIdCondition(has_id=[1, 2, 3])]), lambda i, p: i in (1, 2, 3)),
    (m.Filter(should=[m.FieldCondition(key="tags", match=m.MatchValue(value="y")),
                      m.Filter(must_not=[m.FieldCondition(key="year", range=m.Range(lt=2015))])]),
     lambda i, p: "y" in p["tags"] or p["year"] >= 2015),
]


@pytest.mark.parametrize(("flt", "keep"), FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_filters_count_scroll_and_search(qc: Any, flt: m.Filter, keep: Any) -> None:
    client, x, ids = qc
    want = expected_ids(ids, keep)
    assert client.count(COL, count_filter=flt, exact=True).count == len(want)
    seen: list[Any] = []
    offset = None
    while True:
        page, offset = client.scroll(COL, scroll_filter=flt, limit=30, offset=offset)
        seen += [p.id for p in page]
        if offset is None:
            break
    assert sorted(map(str, seen)) == sorted(map(str, want))
    q = unit(1, 9)[0]
    hits = client.query_points(COL, query=q.tolist(), query_filter=flt, limit=5).points
    rows = [i for i in range(N) if keep(i, payload(i))]
    truth = [ids[i] for i in sorted(rows, key=lambda i: -float(x[i] @ q))[:5]]
    assert [h.id for h in hits] == truth
    assert all(h.payload is not None and "group" in h.payload for h in hits)


def test_search_options_retrieve_and_delete(qc: Any) -> None:
    client, x, ids = qc
    q = x[5]
    hits = client.query_points(COL, query=q.tolist(), limit=3, with_vectors=True, with_payload=["year"]).points
    assert hits[0].id == 5 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert set(hits[0].payload) == {"year"} and np.allclose(hits[0].vector, q, atol=1e-5)
    page2 = client.query_points(COL, query=q.tolist(), limit=2, offset=1).points
    assert [h.id for h in page2] == [h.id for h in hits[1:3]]
    assert all(h.score >= 0.5 for h in client.query_points(COL, query=q.tolist(), limit=50,
                                                            score_threshold=0.5).points)
    legacy = client.search(COL, query_vector=q.tolist(), limit=3) if hasattr(client, "search") else hits
    assert [h.id for h in legacy] == [h.id for h in hits]
    got = client.retrieve(COL, ids=[ids[0], ids[-1], 99_999], with_vectors=True)
    assert {str(p.id) for p in got} == {str(ids[0]), str(ids[-1])}
    assert client.delete(COL, points_selector=m.PointIdsList(points=[ids[0], ids[-1]])).status == "completed"
    assert client.count(COL).count == N - 2
    client.delete(COL, points_selector=m.FilterSelector(filter=m.Filter(
        must=[m.FieldCondition(key="year", match=m.MatchValue(value=2019))])))
    assert client.count(COL).count == N - 2 - sum(payload(i)["year"] == 2019 for i in range(1, N - 1))


def test_payload_index(qc: Any) -> None:
    client, _, _ = qc
    client.create_payload_index(COL, field_name="group", field_schema=m.PayloadSchemaType.KEYWORD)
    schema = client.get_collection(COL).payload_schema
    assert schema["group"].data_type == m.PayloadSchemaType.KEYWORD
    with pytest.raises(UnexpectedResponse) as raised:
        client.create_payload_index(COL, field_name="where", field_schema=m.PayloadSchemaType.GEO)
    assert raised.value.status_code == 400 and "not supported" in str(raised.value)


def test_malformed_requests_found_by_fuzzing_are_4xx(qc: Any, server: Server) -> None:
    import httpx

    r = httpx.put(f"{server.url}/qdrant/collections/{COL}/index",
                  json={"field_name": "g", "field_schema": {"type": {}}}, timeout=30)  # was a 500 (found by fuzzing)
    assert r.status_code == 400 and "field_schema" in r.json()["status"]["error"], r.text
    r = httpx.put(f"{server.url}/qdrant/collections/{COL}/points", json={"batch": {"ids": True}}, timeout=30)
    assert r.status_code == 400 and "must be lists" in r.json()["status"]["error"], r.text  # was a 500 too
    r = httpx.get(f"{server.url}/qdrant/collections/{COL}/points/\u00b3", timeout=30)  # "³".isdigit(): was a 500
    assert r.status_code == 404 and "No point" in r.json()["status"]["error"], r.text


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Any) -> Any:
    srv = Server(tmp_path_factory.mktemp(COL) / "data", models_dir, env={"TANDEM_API_KEY": API_KEY}).start()
    yield srv
    srv.stop_cleanly()


def test_api_key_header(keyed_server: Server) -> None:
    with pytest.raises(UnexpectedResponse) as raised:
        connect(keyed_server, api_key="wrong", check_compatibility=False).get_collections()
    assert raised.value.status_code == 401
    client = connect(keyed_server, api_key=API_KEY)
    assert client.create_collection("k", vectors_config=m.VectorParams(size=4, distance=m.Distance.COSINE))
    assert client.get_collections().collections[0].name == "k"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("points/query", {"query": [0.1] * DIM, "limit": "ten"}),
        ("points/query", {"query": {"nearest": {"name": [1.0]}}}),
        ("points/query", {"query": [0.1] * DIM, "score_threshold": "high"}),
        ("points/query", {"query": [0.1] * DIM, "prefetch": [{"query": [0.1] * DIM}]}),
        ("points/search", {"vector": [0.1] * DIM, "filter": {"must": [{"key": "g", "match": {"text": "x"}}]}}),
        ("points/search", {"vector": [0.1] * DIM, "filter": {"min_should": {"conditions": [], "min_count": 1}}}),
        ("points/scroll", {"limit": 0}),
        ("points/scroll", {"offset": [1]}),
        ("points", {"ids": "1"}),
        ("points/delete", {}),
        ("points/count", {"filter": "group=a"}),
        ("points/query", {"query": [0.1] * DIM, "with_payload": {"include": "year"}}),
    ],
)
def test_bad_requests_get_400_in_qdrant_shape(qc: Any, server: Server, path: str, body: dict[str, Any]) -> None:
    import httpx

    r = httpx.post(f"{server.url}/qdrant/collections/{COL}/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"status", "time"} and r.json()["status"]["error"]
