"""Sparse and hybrid search over HTTP: every mode on `search` and `search/batch`, text kept and
returned, ingestion jobs feeding the sparse stage, and bad combinations answered 422 with
nothing written. A real server with the MiniLM encoder on loopback (tests/server.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.server import REPO_ROOT
from tests.test_service import assert_error

pytestmark = pytest.mark.slow

TEXTS = {
    1: "the quick brown fox jumps over the lazy dog",
    2: "a fast auburn fox leapt above a sleepy hound",
    3: "quarterly earnings beat analyst expectations",
    4: "the central bank raised interest rates again",
    5: "error code ZX-4471 in the payment gateway",
}


@pytest.fixture(scope="module")
def hybrid(client: httpx.Client) -> str:
    r = client.put("/collections/hyb", json={"encoder": "minilm", "sparse": True, "coarse": "flat"})
    assert r.status_code == 201, r.text
    assert r.json()["collection"]["config"]["sparse"] is True
    points = [{"id": i, "text": t, "payload": {"topic": "animals" if i < 3 else "finance"}}
              for i, t in TEXTS.items()]
    assert client.put("/collections/hyb/points", json={"points": points}).status_code == 200
    return "hyb"


def test_every_mode(client: httpx.Client, hybrid: str) -> None:
    r = client.post(f"/collections/{hybrid}/search", json={"text": "ZX-4471", "k": 3})
    body = r.json()
    assert r.status_code == 200 and body["mode"] == "hybrid", r.text
    assert body["hits"][0]["id"] == 5  # the identifier, which the lexical ranking puts first
    assert body["stages_ms"]["sparse"] > 0 and body["stages_ms"]["encode"] > 0
    r = client.post(f"/collections/{hybrid}/search", json={"text": "ZX-4471", "mode": "sparse"})
    assert r.json()["mode"] == "sparse" and [h["id"] for h in r.json()["hits"]] == [5]
    assert r.json()["stages_ms"]["encode"] == 0  # BM25 alone: nothing encoded
    r = client.post(f"/collections/{hybrid}/search", json={"text": "a speedy fox", "mode": "dense", "k": 2})
    assert r.json()["mode"] == "dense" and {h["id"] for h in r.json()["hits"]} == {1, 2}
    flt = {"must": [{"key": "topic", "match": "finance"}]}
    r = client.post(f"/collections/{hybrid}/search", json={"text": "fox bank", "k": 5, "filter": flt})
    assert r.status_code == 200 and {h["id"] for h in r.json()["hits"]} <= {3, 4, 5}
    r = client.post(f"/collections/{hybrid}/search/batch", json={"searches": [
        {"text": "fox", "mode": "sparse"}, {"text": "interest rates"}, {"text": "fox", "mode": "dense", "k": 1}]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["mode"] for x in results] == ["sparse", "hybrid", "dense"]
    assert {h["id"] for h in results[0]["hits"]} == {1, 2}
    assert results[1]["hits"][0]["id"] == 4


def test_text_is_kept_and_returned(client: httpx.Client, hybrid: str) -> None:
    assert client.get(f"/collections/{hybrid}/points/3").json()["text"] == TEXTS[3]
    vec = client.get(f"/collections/{hybrid}/points/3").json()["vector"]
    assert client.put(f"/collections/{hybrid}/points", json={"points": [{"id": 9, "vector": vec}]}).status_code == 200
    assert client.get(f"/collections/{hybrid}/points/9").json()["text"] is None
    ids = {h["id"] for h in client.post(f"/collections/{hybrid}/search",
                                        json={"text": "quarterly earnings", "mode": "sparse"}).json()["hits"]}
    assert ids == {3}  # the vector-only copy has no text: BM25 cannot reach it


def test_ingestion_feeds_the_sparse_stage(client: httpx.Client, hybrid: str) -> None:
    body = "".join(f'{{"id": {100 + i}, "text": "ingested widget number{i}"}}\n' for i in range(20))
    r = client.post(f"/collections/{hybrid}/ingest", content=body, headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    for _ in range(200):
        job = client.get(f"/jobs/{r.json()['job_id']}").json()
        if job["state"] != "running":
            break
        time.sleep(0.05)
    assert job["state"] == "completed" and job["points_committed"] == 20, job
    hits = client.post(f"/collections/{hybrid}/search", json={"text": "number7", "mode": "sparse"}).json()["hits"]
    assert [h["id"] for h in hits] == [107]


def test_bad_combinations_get_422_and_nothing_is_written(client: httpx.Client, hybrid: str) -> None:
    err = assert_error(client.put("/collections/nosparse", json={"dim": 8, "sparse": True}), 422)
    assert "give an encoder" in err["message"]
    assert client.get("/collections/nosparse").status_code == 404
    err = assert_error(client.put("/collections/nosparse2", json={"dim": 8, "coarse": "sparse"}), 422)
    assert client.get("/collections/nosparse2").status_code == 404
    vec = client.get(f"/collections/{hybrid}/points/1").json()["vector"]
    err = assert_error(client.post(f"/collections/{hybrid}/search", json={"vector": vec, "mode": "sparse"}), 422)
    assert "send 'text'" in err["message"]
    err = assert_error(client.post(f"/collections/{hybrid}/search", json={"vector": vec, "mode": "hybrid"}), 422)
    assert client.put("/collections/plain", json={"encoder": "minilm"}).status_code == 201
    err = assert_error(client.post("/collections/plain/search", json={"text": "x", "mode": "hybrid"}), 422)
    assert "needs a sparse stage" in err["message"]
    err = assert_error(client.post("/collections/plain/search/batch", json={"searches": [
        {"text": "x"}, {"text": "y", "mode": "sparse"}]}), 422)
    assert "searches[1]" in err["message"]
    assert_error(client.post(f"/collections/{hybrid}/search", json={"text": "x", "mode": "lexical"}), 422)
    before = client.get(f"/collections/{hybrid}").json()["points"]
    bad = {"points": [{"id": 50, "text": "fine"}, {"id": 51, "text": "x", "vector": vec}]}
    assert_error(client.put(f"/collections/{hybrid}/points", json=bad), 422)
    assert client.get(f"/collections/{hybrid}").json()["points"] == before
    client.delete("/collections/plain")


def test_eval_through_the_service_in_every_mode(server: Any, tmp_path: Path) -> None:
    """`tandem eval --url`: a small BEIR-format set whose queries name each document's identifier,
    which BM25 finds and dense retrieval (on made-up codes) mostly cannot."""
    folder = tmp_path / "codes"
    (folder / "qrels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    subjects = ["pump", "valve", "sensor", "relay", "motor", "fan"]
    docs = {f"d{i}": f"part QX{1000 + i} {subjects[i % 6]} assembly revision {rng.integers(9)}" for i in range(60)}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items()))
    queries = {f"q{i}": f"QX{1000 + i}" for i in range(0, 60, 3)}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(0, 60, 3)))
    done = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--dataset", str(folder), "--url", server.url],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = {line.split()[1]: [float(x) for x in line.split()[2:5]] for line in done.stdout.splitlines()
             if line.startswith("http ")}
    assert set(table) == {"dense", "sparse", "hybrid"}, done.stdout
    assert table["sparse"][0] == pytest.approx(1.0)  # every identifier found first
    assert table["hybrid"][0] >= table["dense"][0] and table["hybrid"][1] == pytest.approx(1.0), done.stdout
