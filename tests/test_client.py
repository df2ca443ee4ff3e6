"""The Python client (service/client.py) and the client side of the CLI (service/client_cli.py)
against a real server on loopback (tests/server.py)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index import errors
from service.client import AsyncClient, Client, RequestFailed
from tests.server import REPO_ROOT, Server

pytestmark = pytest.mark.slow

DIM = 16
VECS = "client_vecs"  # names unique on the session's shared server


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_client_calls_and_typed_errors(server: Server) -> None:
    with Client(server.url) as tandem:
        tandem.create_collection(VECS, dim=DIM)
        x = unit(50, 1)
        assert tandem.upsert(VECS, [{"id": i, "vector": x[i].tolist(), "payload": {"odd": i % 2 == 1}}
                                    for i in range(50)]) == 50
        hits = tandem.search(VECS, vector=x[7], k=3)
        assert hits[0]["id"] == 7 and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
        assert tandem.count(VECS, {"must": [{"key": "odd", "match": True}]}) == 25
        assert VECS in [c["name"] for c in tandem.collections()] and tandem.collection(VECS)["points"] == 50
        with pytest.raises(errors.DimensionMismatch) as raised:
            tandem.search(VECS, vector=[1.0, 2.0], k=3)
        assert raised.value.status == 422 and raised.value.request_id  # type: ignore[attr-defined]
        with pytest.raises(errors.CollectionNotFound):
            tandem.search("missing", vector=x[0])
        with pytest.raises(errors.InvalidFilter, match="unknown operator"):
            tandem.count(VECS, {"must": [{"key": "odd", "like": 1}]})
        assert tandem.delete(VECS, [0, 1, 999]) == 2

    async def run() -> list[Any]:
        async with AsyncClient(server.url) as tandem:
            hits = await tandem.search(VECS, vector=x[9], k=2)
            return [hits, await tandem.count(VECS), await tandem.collections()]

    hits, count, listed = asyncio.run(run())
    assert hits[0]["id"] == 9 and count == 48 and any(c["name"] == VECS for c in listed)


def test_retries_on_429_and_503() -> None:
    # The network edge only: a transport answering 429, 503, then 200 (a real server's overload
    # and start-up answers are tested in tests/test_service.py).
    answers = iter([httpx.Response(429, headers={"retry-after": "0"}), httpx.Response(503), httpx.Response(
        200, json={"collections": [], "unavailable": {}})])
    tandem = Client("http://tandem", transport=httpx.MockTransport(lambda request: next(answers)), backoff=0.001)
    assert tandem.collections() == [] and tandem.retried == 2
    always = Client("http://tandem", retries=2, backoff=0.001, transport=httpx.MockTransport(
        lambda request: httpx.Response(429, json={"error": {"type": "overloaded", "message": "busy",
                                                            "request_id": "r1"}})))
    with pytest.raises(RequestFailed, match="429 overloaded: busy"):
        always.collections()
    assert always.retried == 2


def tandem_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_URL": server.url, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TANDEM_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_ingest_jsonl_with_bad_lines(server: Server, tmp_path: Path) -> None:
    with Client(server.url) as tandem:
        tandem.create_collection("cli_ingested", dim=DIM)
    x = unit(3000, 2)
    lines = [json.dumps({"id": i, "vector": x[i].tolist(), "payload": {"n": i}}) for i in range(3000)]
    lines[10] = "{not json"
    lines[20] = json.dumps({"id": 20, "vector": [1.0, 2.0]})  # wrong dimension
    lines[30] = json.dumps({"vector": x[30].tolist()})  # no id
    path = tmp_path / "points.jsonl"
    path.write_text("\n".join(lines) + "\n")
    done = tandem_cli(server, "ingest", str(path), "--collection", "cli_ingested", "--poll", "0.1")
    assert done.returncode == 1, done.stderr  # some rows were refused
    assert "ingest points.jsonl" in done.stderr and "pt/s" in done.stderr  # the progress bar
    for line in (11, 21, 31):
        assert f"line {line}:" in done.stderr
    assert "2997 points committed from 3000 lines" in done.stdout and "3 refused" in done.stdout
    with Client(server.url) as tandem:
        assert tandem.count("cli_ingested") == 2997
        assert tandem.search("cli_ingested", vector=x[5], k=1)[0]["payload"] == {"n": 5}


def test_cli_ingest_csv_and_parquet_then_search_and_list(server: Server, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with Client(server.url) as tandem:
        tandem.create_collection("cli_texts", encoder="minilm")
    rows = [{"doc": f"d{i}", "body": text, "lang": lang, "year": 2020 + i}
            for i, (text, lang) in enumerate([("the cat sleeps on the sofa", "en"), ("stocks fell sharply", "en"),
                                              ("die Katze schläft", "de"), ("a kitten plays with yarn", "en")])]
    with open(tmp_path / "docs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:2])
    pq.write_table(pa.Table.from_pylist(rows[2:]), tmp_path / "docs.parquet")
    for name in ("docs.csv", "docs.parquet"):
        done = tandem_cli(server, "ingest", str(tmp_path / name), "--collection", "cli_texts", "--id-field", "doc",
                          "--text-field", "body")
        assert done.returncode == 0, done.stderr
        assert "0 refused" in done.stdout
    found = tandem_cli(server, "search", "--collection", "cli_texts", "--text", "a cat", "--k", "2",
                       "--filter", '{"must": [{"key": "lang", "match": "en"}]}')
    assert found.returncode == 0, found.stderr
    table = found.stdout.splitlines()
    assert table[0].split()[:3] == ["#", "score", "id"] and len(table) == 3
    assert {table[1].split()[2], table[2].split()[2]} == {"d0", "d3"} and '"year": 2020' in found.stdout
    aimed = tandem_cli(server, "search", "--collection", "cli_texts", "--text", "a cat", "--k", "2",
                       "--target-recall", "0.9")
    assert aimed.returncode == 0 and len(aimed.stdout.splitlines()) == 3, aimed.stderr
    refused = tandem_cli(server, "search", "--collection", "cli_texts", "--text", "a cat", "--target-recall", "2")
    assert refused.returncode == 2 and "target_recall" in refused.stderr
    listed = tandem_cli(server, "collections")
    assert listed.returncode == 0 and any(line.startswith("cli_texts ") for line in listed.stdout.splitlines())
    described = json.loads(tandem_cli(server, "collections", "cli_texts").stdout)
    assert described["points"] == 4 and described["encoder"] == "minilm"
    missing = tandem_cli(server, "search", "--collection", "nope", "--text", "x")
    assert missing.returncode == 2 and "collection_not_found" in missing.stderr
