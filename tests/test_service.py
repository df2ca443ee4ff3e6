"""The HTTP service end to end: a real server (uvicorn, subprocess), real ONNX model, real disk.

Mirrors the routes: health, collections, points, search, ingestion jobs, errors, auth, limits.
Restarts, SIGTERM drain and crash recovery are in tests/test_service_lifecycle.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.server import Server

pytestmark = pytest.mark.slow

DIM = 16


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    unit: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"type", "message", "request_id"}, err
    assert err["request_id"] == r.headers["x-request-id"]
    assert err["message"]
    if type_ is not None:
        assert err["type"] == type_, err
    return err  # type: ignore[no-any-return]


# -- health ----------------------------------------------------------------------------------------
def test_health_probes_and_request_ids(client: httpx.Client) -> None:
    r = client.get("/livez")
    assert r.status_code == 200 and r.json() == {"status": "alive"}
    assert len(r.headers["x-request-id"]) >= 16
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    r = client.get("/livez", headers={"x-request-id": "trace-42.abc"})
    assert r.headers["x-request-id"] == "trace-42.abc"
    r = client.get("/livez", headers={"x-request-id": "bad id <with> spaces" + "x" * 200})
    assert " " not in r.headers["x-request-id"]
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "tandem_requests_total" in r.text and "process_cpu_seconds_total" in r.text


def test_openapi_documents_every_route(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        "/livez": {"get"}, "/readyz": {"get"}, "/metrics": {"get"},
        "/collections": {"get"}, "/collections/{name}": {"put", "get", "delete"},
        "/collections/{name}/points": {"put"}, "/collections/{name}/points/delete": {"post"},
        "/collections/{name}/points/{point_id}": {"get"}, "/collections/{name}/search": {"post"},
        "/collections/{name}/search/batch": {"post"}, "/collections/{name}/ingest": {"post"},
        "/jobs/{job_id}": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    assert "application/x-ndjson" in paths["/collections/{name}/ingest"]["post"]["requestBody"]["content"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_openapi_examples_are_served_and_bounds_are_the_enforced_ones(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    create = schemas["CollectionCreate"]["examples"][0]
    assert client.put("/collections/examples", json=create).status_code == 201
    upsert = spec["paths"]["/collections/{name}/points"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    for path, example in (
        ("/collections/examples/points", upsert["examples"][0]),
        *(("/collections/examples/search", e) for e in schemas["SearchRequest"]["examples"]),
        ("/collections/examples/search/batch", schemas["SearchBatch"]["examples"][0]),
        ("/collections/examples/count", schemas["CountRequest"]["examples"][0]),
    ):
        r = client.request("PUT" if path.endswith("points") else "POST", path, json=example)
        assert r.status_code == 200, (path, r.text)
    # exactly one source, as validation says; integer bounds as integers (not 1.0)
    assert schemas["SearchRequest"]["oneOf"] == [{"required": [k]} for k in ("vector", "text", "vectors")]
    assert schemas["SearchRequest"]["properties"]["k"]["minimum"] == 1
    assert isinstance(schemas["SearchRequest"]["properties"]["k"]["minimum"], int)
    # ids: the documented bound is the enforced one
    bound = upsert["properties"]["points"]["items"]["properties"]["id"]["anyOf"][0]["exclusiveMaximum"]
    assert bound == 2**63
    for key, status in ((bound - 1, 200), (bound, 422), ("x" * 512, 200), ("x" * 513, 422), ("", 422)):
        r = client.put("/collections/examples/points", json={"points": [{"id": key, "text": "t"}]})
        assert r.status_code == status, (key, r.text)
    client.delete("/collections/examples")


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.post("/livez"), 405)


# -- collections -----------------------------------------------------------------------------------
def test_collection_lifecycle(client: httpx.Client) -> None:
    body = {"dim": DIM, "metric": "cosine", "coarse": "binary", "encoder": None, "multivector": None}
    r = client.put("/collections/life", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "created"
    r = client.put("/collections/life", json=body)
    assert r.status_code == 200 and r.json()["status"] == "exists"
    assert_error(client.put("/collections/life", json={**body, "coarse": "flat"}), 409, "config_conflict")
    err = assert_error(client.put("/collections/bits", json={**body, "bits": 2}), 422, "invalid_argument")
    assert "set coarse to 'ivf'" in err["message"], err
    assert client.get("/collections/bits").status_code == 404  # nothing was created
    info = client.get("/collections/life").json()
    assert info["name"] == "life" and info["config"]["dim"] == DIM and info["encoder"] is None
    assert info["points"] == 0 and info["disk_bytes"] > 0 and info["ram_bytes"] >= 0
    names = [c["name"] for c in client.get("/collections").json()["collections"]]
    assert "life" in names
    assert client.delete("/collections/life").json() == {"status": "dropped", "name": "life"}
    assert_error(client.get("/collections/life"), 404, "collection_not_found")
    assert_error(client.delete("/collections/life"), 404)


def test_collection_bad_requests(client: httpx.Client) -> None:
    for name in ("bad.name", "-x", "a" * 65, "sp%20ace"):
        assert_error(client.put(f"/collections/{name}", json={"dim": 4}), 400, "bad_request")
    assert_error(client.put("/collections/nodim", json={}), 422, "unprocessable")
    assert_error(client.put("/collections/enc", json={"encoder": "nosuch"}), 422)
    err = assert_error(client.put("/collections/enc", json={"encoder": "minilm", "dim": 8}), 422)
    assert "384" in err["message"]
    assert_error(client.put("/collections/x", json={"dim": 4, "metric": "l7"}), 422, "validation_error")
    assert_error(client.put("/collections/x", json={"dim": 4, "unknown": 1}), 422, "validation_error")
    err = assert_error(client.put("/collections/mvbad", json={"dim": 4, "multivector": {"k_sim": 11}}), 422)
    assert "k_sim" in err["message"]
    assert_error(client.put("/collections/x", content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")


# -- points and vector search ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vec_collection(client: httpx.Client) -> np.ndarray:
    """`vecs`: 600 points, ids 0..599 (ints), payload {"group": i % 3, "name": "p<i>"}."""
    assert client.put("/collections/vecs", json={"dim": DIM}).status_code == 201
    x = unit_vectors(600, seed=1)
    for start in range(0, 600, 64):
        points = [{"id": i, "vector": x[i].tolist(), "payload": {"group": i % 3, "name": f"p{i}"}}
                  for i in range(start, min(start + 64, 600))]
        r = client.put("/collections/vecs/points", params={"wait": "true"}, json={"points": points})
        assert r.status_code == 200 and r.json() == {"status": "completed", "upserted": len(points)}, r.text
    return x


def test_vector_search_matches_brute_force(client: httpx.Client, vec_collection: np.ndarray) -> None:
    x = vec_collection
    queries = unit_vectors(20, seed=2)
    found = 0
    for q in queries:
        r = client.post("/collections/vecs/search", json={"vector": q.tolist(), "k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"hits", "took_ms", "stages_ms", "filter_indexed", "mode", "setting"}
        assert body["mode"] == "dense" and body["setting"]["target_recall"] is None
        assert body["filter_indexed"] is None
        assert set(body["stages_ms"]) == {"encode", "coarse", "sparse", "rerank"} and body["stages_ms"]["encode"] == 0
        assert body["stages_ms"]["sparse"] == 0
        truth = set(np.argsort(-(x @ q))[:10].tolist())
        found += len(truth & {h["id"] for h in body["hits"]})
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True)
    assert found / 200 >= 0.9
    exact = client.post("/collections/vecs/search", json={"vector": queries[0].tolist(), "k": 5, "exact": True}).json()
    assert [h["id"] for h in exact["hits"]] == np.argsort(-(x @ queries[0]))[:5].tolist()
    assert math.isclose(exact["hits"][0]["score"], float(np.max(x @ queries[0])), rel_tol=1e-4)


def test_search_filter_and_payload(client: httpx.Client, vec_collection: np.ndarray) -> None:
    q = vec_collection[5].tolist()
    body = {"vector": q, "k": 5, "filter": {"must": [{"key": "group", "match": 2}]}}
    hits = client.post("/collections/vecs/search", json=body).json()["hits"]
    assert hits[0]["id"] == 5 and all(h["payload"]["group"] == 2 for h in hits)
    hits = client.post("/collections/vecs/search", json={**body, "with_payload": False}).json()["hits"]
    assert all(h["payload"] is None for h in hits)
    bad = {"vector": q, "filter": {"must": [{"key": "group", "approx": 2}]}}
    assert_error(client.post("/collections/vecs/search", json=bad), 422, "invalid_filter")


def test_search_errors(client: httpx.Client, vec_collection: np.ndarray) -> None:
    url = "/collections/vecs/search"
    assert_error(client.post(url, json={"vector": [1.0, 2.0]}), 422, "dimension_mismatch")
    assert_error(client.post(url, json={"text": "hello"}), 422, "unprocessable")  # no encoder
    assert_error(client.post(url, json={}), 422, "validation_error")
    assert_error(client.post(url, json={"vector": [0.0] * DIM}), 422, "invalid_vector")
    assert_error(client.post(url, json={"vector": [1.0] * DIM, "k": 0}), 422)
    assert_error(client.post("/collections/missing/search", json={"vector": [1.0] * DIM}), 404)


def test_search_batch(client: httpx.Client, vec_collection: np.ndarray) -> None:
    x = vec_collection
    searches = [{"vector": x[i].tolist(), "k": 3} for i in range(5)]
    searches.append({"vector": x[9].tolist(), "k": 1, "exact": True})
    r = client.post("/collections/vecs/search/batch", json={"searches": searches})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["hits"][0]["id"] for res in results] == [0, 1, 2, 3, 4, 9]
    assert len(results[5]["hits"]) == 1
    too_many = {"searches": [{"vector": x[0].tolist()}] * 9}
    assert_error(client.post("/collections/vecs/search/batch", json=too_many), 413, "batch_too_large")


def test_points_get_delete_and_ids(client: httpx.Client, vec_collection: np.ndarray) -> None:
    r = client.get("/collections/vecs/points/7")
    assert r.status_code == 200
    point = r.json()
    assert point["id"] == 7 and point["payload"] == {"group": 1, "name": "p7"}
    assert np.allclose(point["vector"], vec_collection[7], atol=1e-6)
    assert client.get("/collections/vecs/points/7", params={"with_vector": "false"}).json()["vector"] is None
    # a digit string id, addressed with ?id_type=string
    v = vec_collection[0].tolist()
    r = client.put("/collections/vecs/points", json={"points": [{"id": "7", "vector": v, "payload": {"s": 1}}]})
    assert r.status_code == 200
    assert client.get("/collections/vecs/points/7", params={"id_type": "string"}).json()["payload"] == {"s": 1}
    assert client.get("/collections/vecs/points/7").json()["payload"]["name"] == "p7"
    assert_error(client.get("/collections/vecs/points/abc", params={"id_type": "int"}), 400)
    assert_error(client.get("/collections/vecs/points/nosuch"), 404, "not_found")
    r = client.post("/collections/vecs/points/delete", json={"ids": ["7", 599, "never"]})
    assert r.json() == {"status": "completed", "deleted": 2}
    assert_error(client.get("/collections/vecs/points/599"), 404)
    assert_error(client.post("/collections/vecs/points/delete", json={"ids": []}), 422)
    assert client.get("/collections/vecs").json()["points"] == 599


def test_upsert_errors_and_limits(client: httpx.Client, vec_collection: np.ndarray) -> None:
    url = "/collections/vecs/points"
    v = [0.1] * DIM
    assert_error(client.put(url, json={"points": [{"id": 1, "vector": [1.0]}]}), 422, "dimension_mismatch")
    assert_error(client.put(url, json={"points": [{"id": 1, "vector": v, "text": "x"}]}), 422, "validation_error")
    assert_error(client.put(url, json={"points": [{"id": -1, "vector": v}]}), 422, "invalid_id")
    assert_error(client.put(url, json={"points": [{"id": 1.5, "vector": v}]}), 422, "validation_error")
    dup = {"points": [{"id": 1, "vector": v}, {"id": 1, "vector": v}]}
    assert_error(client.put(url, json=dup), 422, "duplicate_id")
    assert_error(client.put(url, json={"points": [{"id": 1, "text": "no encoder"}]}), 422, "unprocessable")
    assert_error(client.put(url, json={"points": [{"id": 1, "vectors": [v]}]}), 422, "unprocessable")
    too_many = {"points": [{"id": i, "vector": v} for i in range(65)]}
    assert_error(client.put(url, json=too_many), 413, "batch_too_large")
    huge = b'{"points": [' + b" " * (2**20 + 10) + b"]}"
    assert_error(client.put(url, content=huge, headers={"content-type": "application/json"}), 413, "body_too_large")

    def chunked() -> Any:
        yield b'{"points": ['
        for _ in range(40):
            yield b" " * 32768
        yield b"]}"

    r = client.put(url, content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    # atomic: the bad batch above wrote nothing
    assert client.get("/collections/vecs/points/1").json()["payload"] == {"group": 1, "name": "p1"}


def test_upsert_without_wait(client: httpx.Client, vec_collection: np.ndarray) -> None:
    v = vec_collection[3].tolist()
    r = client.put("/collections/vecs/points", params={"wait": "false"},
                   json={"points": [{"id": "async-1", "vector": v}]})
    assert r.status_code == 202 and r.json() == {"status": "acknowledged", "upserted": 1}
    deadline = time.monotonic() + 10
    while client.get("/collections/vecs/points/async-1").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- text ------------------------------------------------------------------------------------------
DOCS = {
    "cat": "a small cat sleeps on the warm windowsill",
    "market": "stock markets fell sharply after the interest rate decision",
    "rain": "heavy rain and strong wind are expected tomorrow",
    "code": "the python function returns a list of integers",
}


def test_text_collection_and_search(client: httpx.Client) -> None:
    r = client.put("/collections/texts", json={"encoder": "minilm"})
    assert r.status_code == 201 and r.json()["collection"]["config"]["dim"] == 384
    points = [{"id": k, "text": t, "payload": {"topic": k}} for k, t in DOCS.items()]
    assert client.put("/collections/texts/points", json={"points": points}).json()["upserted"] == 4
    for query, expected in [("kitten napping", "cat"), ("weather forecast", "rain"),
                            ("finance and shares", "market"), ("programming", "code")]:
        r = client.post("/collections/texts/search", json={"text": query, "k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["hits"][0]["id"] == expected, (query, body)
        assert body["stages_ms"]["encode"] > 0 and body["took_ms"] >= body["stages_ms"]["encode"]
    batch = {"searches": [{"text": "kitten"}, {"text": "umbrella weather", "k": 1}]}
    results = client.post("/collections/texts/search/batch", json=batch).json()["results"]
    assert results[0]["hits"][0]["id"] == "cat" and results[1]["hits"][0]["id"] == "rain"
    assert_error(client.post("/collections/texts/search", json={"vector": [1.0] * 3}), 422, "dimension_mismatch")


# -- ingestion ---------------------------------------------------------------------------------------
def wait_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def test_ingest_job_with_bad_lines(client: httpx.Client) -> None:
    assert client.put("/collections/ingested", json={"dim": DIM, "encoder": None}).status_code == 201
    x = unit_vectors(350, seed=3)
    import json

    lines = [json.dumps({"id": i, "vector": x[i].tolist(), "payload": {"i": i}}) for i in range(350)]
    bad = {
        10: "{not json",
        20: json.dumps({"vector": x[0].tolist()}),  # no id
        30: json.dumps({"id": "w", "vector": [1.0, 2.0]}),  # wrong dim
        40: json.dumps({"id": "t", "text": "no encoder here"}),
        50: json.dumps({"id": "z", "vector": [0.0] * DIM}),  # zero under cosine
        60: '{"id": "long", "vector": [' + "1.0, " * 2000 + "1.0]}",  # over --max-line-bytes
    }
    body_lines: list[str] = []
    for i, line in enumerate(lines):
        body_lines.append(line)
        if i in bad:
            body_lines.append(bad[i])
    body_lines.insert(100, "")  # blank lines are skipped silently
    body = ("\n".join(body_lines) + "\n").encode()
    r = client.post("/collections/ingested/ingest", content=body, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["bytes_received"] == len(body)
    job = wait_job(client, accepted["job_id"])
    assert job["state"] == "completed", job
    assert job["points_committed"] == 350
    assert job["lines_read"] == len(body_lines)
    assert job["error_count"] == len(bad) == len(job["errors"])
    numbers = [e["line"] for e in job["errors"]]
    assert numbers == sorted(numbers)
    assert body_lines[numbers[0] - 1] == bad[10]
    messages = " | ".join(e["message"] for e in job["errors"])
    for needle in ("JSON", "id", "dim", "encoder", "zeros", "4096"):
        assert needle in messages, (needle, messages)
    assert job["rate_per_s"] > 0
    assert client.get("/collections/ingested").json()["points"] == 350
    assert client.get("/collections/ingested/points/349").json()["payload"] == {"i": 349}
    assert_error(client.get("/jobs/not-a-job"), 404)
    assert_error(client.post("/collections/missing/ingest", content=b"{}\n"), 404)


def test_ingest_text_job(client: httpx.Client) -> None:
    assert client.put("/collections/ingtext", json={"encoder": "minilm"}).status_code == 201
    import json

    body = "".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in DOCS.items()).encode()
    job = wait_job(client, client.post("/collections/ingtext/ingest", content=body).json()["job_id"])
    assert job["state"] == "completed" and job["points_committed"] == 4, job
    hits = client.post("/collections/ingtext/search", json={"text": "kitten", "k": 1}).json()["hits"]
    assert hits[0]["id"] == "cat"


# -- metrics after traffic -----------------------------------------------------------------------------
def test_metrics_after_traffic(client: httpx.Client, vec_collection: np.ndarray) -> None:
    client.post("/collections/vecs/search", json={"vector": vec_collection[0].tolist()})
    text = client.get("/metrics").text
    for needle in (
        'tandem_requests_total{method="POST",route="/collections/{name}/search",status="200"}',
        'tandem_request_duration_seconds_bucket{le="0.005",method="POST",route="/collections/{name}/search"',
        'tandem_search_stage_duration_seconds_count{stage="rerank"}',
        'tandem_search_stage_duration_seconds_count{stage="coarse"}',
        "tandem_search_candidates_count",
        'tandem_points{collection="vecs"}',
        "tandem_search_queue_depth",
        "tandem_ingested_points_total",
        "tandem_ingest_failed_lines_total",
        "tandem_ready 1.0",
    ):
        assert needle in text, needle


# -- auth and overload: a second server ----------------------------------------------------------------
API_KEY = "s3cret-test-key-123"


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Any) -> Any:
    srv = Server(
        tmp_path_factory.mktemp("locked") / "data", models_dir,
        "--search-queue-size", "2", "--encode-batch-size", "1", "--batch-wait-ms", "0",
        env={"TANDEM_API_KEY": API_KEY, "TANDEM_ENCODER_THREADS": "1"},
    ).start()
    yield srv
    srv.stop_cleanly()
    assert API_KEY not in srv.log(), "the API key must never be logged"


def test_auth(locked_server: Server) -> None:
    with locked_server.client() as c:
        for path in ("/livez", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200, path
        err = assert_error(c.get("/collections"), 401, "unauthorized")
        assert "Bearer" in err["message"]
        r = c.get("/collections", headers={"Authorization": "Bearer wrong-key-xxxxx"})
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.put("/collections/a", json={"dim": 4}, headers={"Authorization": API_KEY}), 401)
        assert_error(c.get("/jobs/x"), 401)
        assert_error(c.put("/collections/a/index", json={"key": "k", "type": "keyword"}), 401)
        assert_error(c.post("/collections/a/count", json={}), 401)
        assert_error(c.post("/collections/a/facet", json={"key": "k"}), 401)
        ok = {"Authorization": f"Bearer {API_KEY}"}
        assert c.get("/collections", headers=ok).status_code == 200
        assert c.put("/collections/a", json={"encoder": "minilm"}, headers=ok).status_code == 201


def test_full_queue_answers_429(locked_server: Server) -> None:
    import asyncio

    headers = {"Authorization": f"Bearer {API_KEY}"}
    with locked_server.client(headers=headers) as c:
        c.put("/collections/q", json={"encoder": "minilm"})
        c.put("/collections/q/points", json={"points": [{"id": 1, "text": "hello"}]})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=locked_server.url, headers=headers, timeout=60) as ac:
            long_text = "a fairly long query about many things " * 20
            return await asyncio.gather(*[
                ac.post("/collections/q/search", json={"text": f"{long_text} {i}"}) for i in range(40)
            ])

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 429}
    assert_error(next(r for r in responses if r.status_code == 429), 429, "overloaded")


def test_readyz_503_when_startup_fails(tmp_path: Any, models_dir: Any) -> None:
    data = tmp_path / "data"  # a damaged collection does not stop start-up (test_reliability); a damaged job store does
    data.mkdir()
    (data / "jobs.sqlite").write_bytes(b"this is not a sqlite file" * 100)
    srv = Server(data, models_dir, "--encoder", "").start(wait_ready=False)
    try:
        with srv.client() as c:
            deadline = time.monotonic() + 30
            while "start-up failed" not in c.get("/readyz").text:
                assert time.monotonic() < deadline, srv.log()[-2000:]
                time.sleep(0.05)
            err = assert_error(c.get("/readyz"), 503, "not_ready")
            assert "start-up failed" in err["message"]
            assert c.get("/livez").status_code == 200
            assert_error(c.get("/collections"), 503, "not_ready")
    finally:
        srv.stop_cleanly()


def test_base64_vectors(client: httpx.Client, vec_collection: np.ndarray) -> None:
    import base64

    def b64(v: np.ndarray) -> str:
        return base64.b64encode(v.astype("<f4").tobytes()).decode()

    v = vec_collection[11]
    r = client.put("/collections/vecs/points", json={"points": [{"id": "b64", "vector": b64(v)}]})
    assert r.status_code == 200, r.text
    assert np.allclose(client.get("/collections/vecs/points/b64").json()["vector"], v, atol=1e-6)
    hits = client.post("/collections/vecs/search", json={"vector": b64(v), "k": 2}).json()["hits"]
    assert {h["id"] for h in hits} == {11, "b64"}
    url = "/collections/vecs/search"
    assert_error(client.post(url, json={"vector": "not base64!"}), 422, "invalid_vector")
    assert_error(client.post(url, json={"vector": b64(v[:3])}), 422, "dimension_mismatch")
