"""POST /collections/{name}/ingest/files on a single node: NDJSON and Parquet files under
--import-dir become an ingestion job (and nothing outside that folder is read)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.server import TEST_FLAGS, Server
from tests.test_service import wait_job

DIM = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def importer(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, folder: Path) -> Iterator[httpx.Client]:
    srv = Server(tmp_path_factory.mktemp("files") / "data", models_dir, *TEST_FLAGS, "--import-dir", str(folder))
    srv.start()
    with srv.client() as c:
        yield c
    srv.stop()


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ndjson_and_parquet_files_make_one_job(importer: httpx.Client, folder: Path) -> None:
    x = vectors(500, seed=1)
    lines = [json.dumps({"id": i, "vector": x[i].tolist(), "payload": {"i": i}}) for i in range(300)]
    lines[9] = "{not json"
    lines[19] = json.dumps({"id": "w", "vector": [1.0, 2.0]})
    lines[29] = '{"id": "long", "vector": [' + "1.0, " * 2000 + "1.0]}"  # over --max-line-bytes (4096)
    (folder / "a.ndjson").write_text("\n".join(lines) + "\n")
    sub = folder / "sub"
    sub.mkdir()
    pq.write_table(pa.table({  # extra columns go to the payload; a struct payload column is kept as is
        "id": [f"p{i}" for i in range(300, 400)], "vector": [x[i].tolist() for i in range(300, 400)],
        "lang": ["en"] * 100,
    }), sub / "b.parquet")
    pq.write_table(pa.table({
        "id": list(range(400, 500)), "vector": [x[i].tolist() for i in range(400, 500)],
        "payload": [{"i": i, "tag": "t"} for i in range(400, 500)],
    }), folder / "c.parquet")
    assert importer.put("/collections/files", json={"dim": DIM}).status_code == 201
    r = importer.post("/collections/files/ingest/files", json={"paths": ["a.ndjson", "sub/b.parquet", "c.parquet"]})
    assert r.status_code == 202, r.text
    assert r.json()["bytes_received"] == sum(os.path.getsize(p) for p in
                                             (folder / "a.ndjson", sub / "b.parquet", folder / "c.parquet"))
    job = wait_job(importer, r.json()["job_id"])
    assert job["state"] == "completed", job
    assert job["lines_read"] == 500 and job["points_committed"] == 497
    assert [e["line"] for e in job["errors"]] == [10, 20, 30]
    assert "dim is 8" in job["errors"][1]["message"] and "--max-line-bytes" in job["errors"][2]["message"]
    assert job["message"] == "files: a.ndjson (lines 1-300), sub/b.parquet (lines 301-400), c.parquet (lines 401-500)"
    assert importer.get("/collections/files").json()["points"] == 497
    assert importer.get("/collections/files/points/p350").json()["payload"] == {"lang": "en"}
    assert importer.get("/collections/files/points/450").json()["payload"] == {"i": 450, "tag": "t"}
    hit = importer.post("/collections/files/search", json={"vector": x[123].tolist(), "k": 1, "exact": True})
    assert hit.json()["hits"][0]["id"] == 123


def test_only_files_under_the_import_folder(importer: httpx.Client, folder: Path, tmp_path: Path) -> None:
    assert importer.put("/collections/guarded", json={"dim": DIM}).status_code == 201
    outside = tmp_path / "secret.ndjson"
    outside.write_text(json.dumps({"id": 1, "vector": [1.0] * DIM}) + "\n")
    (folder / "link.ndjson").symlink_to(outside)  # a link out of the folder is outside it too
    (folder / "notes.txt").write_text("hello\n")
    for paths, status, kind in (
        ([str(outside)], 403, "forbidden"), (["../" + outside.name], 403, "forbidden"),
        (["link.ndjson"], 403, "forbidden"), (["missing.ndjson"], 404, "not_found"),
        (["notes.txt"], 422, "unprocessable"), ([], 422, None), (["sub"], 404, "not_found"),
    ):
        r = importer.post("/collections/guarded/ingest/files", json={"paths": paths})
        assert r.status_code == status, (paths, r.text)
        if kind is not None:
            assert r.json()["error"]["type"] == kind, r.text
    r = importer.post("/collections/nope/ingest/files", json={"paths": ["a.ndjson"]})
    assert r.status_code == 404
    assert importer.get("/collections/guarded").json()["points"] == 0
    assert not any(j["collection"] == "guarded" for j in importer.get("/jobs").json()["jobs"])  # no job made


def test_file_ingestion_is_off_without_an_import_folder(client: httpx.Client) -> None:
    assert client.put("/collections/nofiles", json={"dim": DIM}).status_code == 201
    r = client.post("/collections/nofiles/ingest/files", json={"paths": ["a.ndjson"]})
    assert r.status_code == 403 and "--import-dir" in r.json()["error"]["message"]
