"""Payload indexes, count and facet over HTTP: a real server on loopback (tests/server.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest

from tests.test_payload_index import ref_filter
from tests.test_service import assert_error, unit_vectors

pytestmark = pytest.mark.slow

LANGS = ["en", "de", "fr"]


@pytest.fixture(scope="module")
def payloads(client: httpx.Client) -> list[dict[str, Any]]:
    """`pay`: 300 points with a language, a year, tags and a date."""
    assert client.put("/collections/pay", json={"dim": 16}).status_code == 201
    x = unit_vectors(300, seed=3)
    payloads = [{"lang": LANGS[i % 3], "year": 2000 + i % 25, "tags": ["a", "b"][: i % 3],
                 "at": f"2024-0{1 + i % 9}-15T12:00:00Z"} for i in range(300)]
    for start in range(0, 300, 50):
        points = [{"id": i, "vector": x[i].tolist(), "payload": payloads[i]} for i in range(start, start + 50)]
        r = client.put("/collections/pay/points", params={"wait": "true"}, json={"points": points})
        assert r.status_code == 200, r.text
    return payloads


def test_payload_index_routes(client: httpx.Client, payloads: list[dict[str, Any]]) -> None:
    r = client.put("/collections/pay/index", json={"key": "lang", "type": "keyword"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "created" and r.json()["index"]["points"] == 300
    assert client.put("/collections/pay/index", json={"key": "lang", "type": "keyword"}).json()["status"] == "exists"
    for key, type in (("year", "integer"), ("at", "datetime"), ("tags", "keyword")):
        assert client.put("/collections/pay/index", json={"key": key, "type": type}).status_code == 201
    listed = client.get("/collections/pay/index").json()["indexes"]
    assert {i["key"]: i["type"] for i in listed} == {"lang": "keyword", "year": "integer", "at": "datetime",
                                                      "tags": "keyword"}
    described = client.get("/collections/pay").json()["payload_indexes"]
    assert all(i["ram_bytes"] > 0 for i in described) and len(described) == 4
    r = client.delete("/collections/pay/index/tags")
    assert r.status_code == 200 and "tags" not in {i["key"] for i in r.json()["indexes"]}
    assert_error(client.delete("/collections/pay/index/tags"), 404, "not_found")
    assert client.put("/collections/pay/index", json={"key": "tags", "type": "keyword"}).status_code == 201


def test_count_facet_and_filtered_search(client: httpx.Client, payloads: list[dict[str, Any]]) -> None:
    client.put("/collections/pay/index", json={"key": "lang", "type": "keyword"})
    client.put("/collections/pay/index", json={"key": "year", "type": "integer"})
    client.put("/collections/pay/index", json={"key": "tags", "type": "keyword"})
    flt = {"must": [{"key": "year", "range": {"gte": 2010, "lt": 2020}}],
           "should": [{"key": "tags", "match": "b"}, {"must_not": [{"key": "lang", "match": "en"}]}]}
    expected = [i for i, p in enumerate(payloads) if ref_filter(p, flt)]
    r = client.post("/collections/pay/count", json={"filter": flt})
    assert r.status_code == 200 and r.json() == {"count": len(expected), "filter_indexed": True}
    assert client.post("/collections/pay/count", json={}).json()["count"] == 300
    unindexed = {"must": [{"key": "missing_key", "exists": False}]}
    assert client.post("/collections/pay/count", json={"filter": unindexed}).json() == {
        "count": 300, "filter_indexed": False}
    r = client.post("/collections/pay/facet", json={"key": "lang", "filter": flt})
    counts = {lang: sum(payloads[i]["lang"] == lang for i in expected) for lang in LANGS}
    assert r.status_code == 200
    assert {v["value"]: v["count"] for v in r.json()["values"]} == {k: v for k, v in counts.items() if v}
    assert [v["count"] for v in r.json()["values"]] == sorted((v for v in counts.values() if v), reverse=True)
    assert r.json()["indexed"] is True
    assert len(client.post("/collections/pay/facet", json={"key": "lang", "limit": 1}).json()["values"]) == 1
    r = client.post("/collections/pay/facet", json={"key": "missing_key"})  # no index: from the payloads
    assert r.status_code == 200 and r.json() == {"key": "missing_key", "values": [], "indexed": False}
    q = unit_vectors(1, seed=9)[0].tolist()
    r = client.post("/collections/pay/search", json={"vector": q, "k": 500, "filter": flt})
    assert r.status_code == 200 and r.json()["filter_indexed"] is True
    assert sorted(h["id"] for h in r.json()["hits"]) == expected
    r = client.post("/collections/pay/search", json={"vector": q, "k": 5, "filter": unindexed})
    assert r.json()["filter_indexed"] is False and len(r.json()["hits"]) == 5
    assert client.post("/collections/pay/search", json={"vector": q}).json()["filter_indexed"] is None
    batch = client.post("/collections/pay/search/batch", json={"searches": [{"vector": q, "filter": flt}]})
    assert batch.json()["results"][0]["filter_indexed"] is True
    x = np.asarray(q)
    assert x.shape == (16,)


def test_payload_errors(client: httpx.Client, payloads: list[dict[str, Any]]) -> None:
    client.put("/collections/pay/index", json={"key": "lang", "type": "keyword"})
    before = client.get("/collections/pay/index").json()
    err = assert_error(client.put("/collections/pay/index", json={"key": "note", "type": "text"}), 422)
    assert "keyword" in err["message"]
    assert_error(client.put("/collections/pay/index", json={"key": "a..b", "type": "keyword"}), 422)
    err = assert_error(client.post("/collections/pay/count", json={
        "filter": {"must": [{"key": "lang", "range": {"gte": 1}}]}}), 422, "invalid_filter")
    assert "indexed as keyword" in err["message"]
    err = assert_error(client.post("/collections/pay/search", json={
        "vector": [1.0] * 16, "filter": {"must": [{"key": "at", "range": {"gte": "yesterday"}}]}}), 422)
    assert "RFC 3339" in err["message"]
    err = assert_error(client.post("/collections/pay/facet", json={"key": "year"}), 422)
    assert "indexed as integer" in err["message"]
    assert_error(client.post("/collections/nope/count", json={}), 404, "collection_not_found")
    assert client.get("/collections/pay/index").json() == before


def test_openapi_documents_payload_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"put", "get"} <= set(paths["/collections/{name}/index"])
    assert "delete" in paths["/collections/{name}/index/{key}"]
    assert "post" in paths["/collections/{name}/count"] and "post" in paths["/collections/{name}/facet"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["PayloadIndexCreate"]["properties"]["type"]["enum"] == ["keyword", "integer", "float", "bool",
                                                                          "datetime"]
    documented = json.dumps(schema["CountRequest"]["properties"]["filter"])  # every condition, with its bounds
    for condition in ("match", "any", "range", "exists", "is_null", "is_empty", "has_id"):
        assert f'"title": "condition: {condition}"' in documented, condition
    assert '"format": "date-time"' in documented and '"pattern": "^[A-Za-z0-9_' in documented
