"""Multi-vector collections over HTTP: vector sets, text as token sets, MaxSim scores, bad sets."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from index.fde import chamfer
from tests.test_service import assert_error

pytestmark = pytest.mark.slow

DIM = 16


def unit_sets(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((int(rng.integers(2, 12)), DIM)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def test_multivector_collection_end_to_end(client: httpx.Client) -> None:
    body = {"dim": DIM, "multivector": {"k_sim": 3, "d_proj": 8, "r_reps": 10, "max_vectors": 32}}
    r = client.put("/collections/mv", json=body)
    assert r.status_code == 201, r.text
    assert client.put("/collections/mv", json=body).status_code == 200
    info = client.get("/collections/mv").json()
    assert info["config"]["multivector"]["k_sim"] == 3

    docs = unit_sets(200, seed=1)
    points = [{"id": i, "vectors": d.tolist(), "payload": {"n": i}} for i, d in enumerate(docs)]
    for start in range(0, len(points), 50):
        r = client.put("/collections/mv/points", json={"points": points[start : start + 50]})
        assert r.status_code == 200, r.text

    query = docs[7][:3]
    truth = np.argsort(-chamfer(query, docs), kind="stable")[:5].tolist()
    r = client.post("/collections/mv/search", json={"vectors": query.tolist(), "k": 5, "exact": True})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert [h["id"] for h in hits] == truth
    assert hits[0]["score"] == pytest.approx(float(chamfer(query, [docs[truth[0]]])[0]), abs=1e-4)

    r = client.post("/collections/mv/search", json={"vectors": query.tolist(), "k": 5, "oversampling": 20})
    assert r.status_code == 200, r.text
    assert r.json()["hits"][0]["id"] == 7 and r.json()["hits"][0]["payload"] == {"n": 7}

    got = client.get("/collections/mv/points/7").json()
    assert got["vector"] is None and np.allclose(np.array(got["vectors"]), docs[7], atol=1e-5)

    # bad sets: 422 with a clear message, nothing written
    count = client.get("/collections/mv").json()["points"]
    bad = [
        ({"id": "x", "vectors": []}, "empty"),
        ({"id": "x", "vectors": [[0.1] * DIM, [0.1] * (DIM - 1)]}, "ragged"),
        ({"id": "x", "vectors": [[0.1] * (DIM + 1)]}, "dimension"),
        ({"id": "x", "vectors": [[0.1] * DIM] * 33}, "at most 32"),
        ({"id": "x", "vector": [0.1] * DIM}, "multi-vector"),
    ]
    for point, says in bad:
        r = client.put("/collections/mv/points", json={"points": [{"id": "ok", "vectors": [[0.2] * DIM]}, point]})
        err = assert_error(r, 422)
        assert says in err["message"], err
    nan = client.put(
        "/collections/mv/points",
        content=b'{"points": [{"id": "x", "vectors": [[NaN' + b", 0.1" * (DIM - 1) + b"]]}]}",
        headers={"content-type": "application/json"},
    )
    assert nan.status_code in (400, 422), nan.text
    assert client.get("/collections/mv").json()["points"] == count
    assert client.get("/collections/mv/points/ok").status_code == 404
    assert client.delete("/collections/mv").status_code in (200, 204)


def test_multivector_text_collection(client: httpx.Client) -> None:
    r = client.put("/collections/mvtext", json={"encoder": "minilm", "multivector": {}})
    assert r.status_code == 201, r.text
    texts = {
        "cats": "Cats are small domesticated felines that purr and hunt mice.",
        "rust": "Rust is a systems programming language focused on memory safety.",
        "tea": "Green tea is brewed from unoxidised leaves of Camellia sinensis.",
    }
    r = client.put("/collections/mvtext/points", json={"points": [{"id": k, "text": v} for k, v in texts.items()]})
    assert r.status_code == 200, r.text
    r = client.post("/collections/mvtext/search", json={"text": "a memory-safe programming language", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hits"][0]["id"] == "rust"
    assert body["stages_ms"]["encode"] > 0

    ndjson = "\n".join(
        ['{"id": "kettle", "text": "An electric kettle boils water for tea."}', '{"id": "bad", "vector": [1.0]}']
    )
    r = client.post("/collections/mvtext/ingest", content=ndjson, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    for _ in range(200):
        state = client.get(f"/jobs/{job}").json()
        if state["state"] != "running":
            break
        time.sleep(0.05)
    assert state["state"] == "completed", state
    assert state["points_committed"] == 1 and [e["line"] for e in state["errors"]] == [2]
    hits = client.post("/collections/mvtext/search", json={"text": "boiling water", "k": 1}).json()["hits"]
    assert hits[0]["id"] == "kettle"
