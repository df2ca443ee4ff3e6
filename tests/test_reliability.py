"""Attacks on the service: malformed requests, a full disk, damaged files, and what the logs hold.

Every malformed request gets a clear 4xx; a full disk gets a 507 and leaves the collection as it
was; a damaged collection is reported on open and does not take the others down; no route but
health and metrics answers without the API key; the key and payloads never reach the logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.server import Server
from tests.test_service import assert_error

pytestmark = pytest.mark.slow

DIM = 8


@pytest.fixture(scope="module")
def col(client: httpx.Client) -> str:
    r = client.put("/collections/attacked", json={"dim": DIM})
    assert r.status_code in (200, 201), r.text
    points = [{"id": i, "vector": np.random.default_rng(i).standard_normal(DIM).tolist()} for i in range(50)]
    assert client.put("/collections/attacked/points", json={"points": points}).status_code == 200
    return "attacked"


def count(client: httpx.Client, name: str) -> int:
    return int(client.get(f"/collections/{name}").json()["points"])


# -- bad input, one case each ----------------------------------------------------------------------
def test_100_mb_body_is_refused_with_413(server: Server, col: str) -> None:
    def body() -> Iterator[bytes]:
        chunk = b"x" * 2**20
        for _ in range(100):
            yield chunk

    with server.client() as c:
        try:
            r = c.put("/collections/attacked/points", content=body(),
                      headers={"content-type": "application/json", "content-length": str(100 * 2**20)})
        except httpx.TransportError:  # the server may answer and close before the upload ends
            pytest.fail("the server closed the connection instead of answering 413")
        assert_error(r, 413, "body_too_large")
        # and without a content-length (chunked): counted as it arrives
        r = c.put("/collections/attacked/points", content=body(), headers={"content-type": "application/json"})
        assert_error(r, 413, "body_too_large")


def test_deeply_nested_payload(client: httpx.Client, col: str) -> None:
    nested = '{"a": ' * 100_000 + "1" + "}" * 100_000  # json.dumps itself could not write this
    text = f'{{"points": [{{"id": "deep", "vector": {[0.1] * DIM}, "payload": {nested}}}]}}'
    before = count(client, col)
    r = client.put(f"/collections/{col}/points", content=text, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code)
    assert count(client, col) == before
    ok = {"a": {"b": {"c": [1, 2, {"d": "e"}]}}}  # ordinary nesting is fine
    point = {"id": "nest", "vector": [0.1] * DIM, "payload": ok}
    r = client.put(f"/collections/{col}/points", json={"points": [point]})
    assert r.status_code == 200, r.text
    assert client.get(f"/collections/{col}/points/nest").json()["payload"] == ok


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_in_vectors(client: httpx.Client, col: str, literal: str) -> None:
    vector = ", ".join(["0.5"] * (DIM - 1) + [literal])
    before = count(client, col)
    r = client.put(f"/collections/{col}/points", content=f'{{"points": [{{"id": "nan", "vector": [{vector}]}}]}}',
                   headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code)
    assert count(client, col) == before
    r = client.post(f"/collections/{col}/search", content=f'{{"vector": [{vector}]}}',
                    headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


@pytest.mark.parametrize("k", [0, -1, 10**9, "ten", 2.5])
def test_bad_k(client: httpx.Client, col: str, k: Any) -> None:
    err = assert_error(client.post(f"/collections/{col}/search", json={"vector": [0.1] * DIM, "k": k}), 422)
    assert "k" in err["message"]


def test_unicode_and_very_long_ids(client: httpx.Client, col: str) -> None:
    for pid in ("ünïcødé-ид-标识-🙂", "a b?c#d%20e\u0000", "x" * 512, "12345"):
        r = client.put(f"/collections/{col}/points", json={"points": [{"id": pid, "vector": [0.2] * DIM}]})
        assert r.status_code == 200, r.text
        got = client.get(f"/collections/{col}/points/{quote(pid, safe='')}", params={"id_type": "string"})
        assert got.status_code == 200 and got.json()["id"] == pid, got.text
    before = count(client, col)
    err = assert_error(
        client.put(f"/collections/{col}/points", json={"points": [{"id": "y" * 100_000, "vector": [0.2] * DIM}]}), 422
    )
    assert "characters" in err["message"]
    assert count(client, col) == before


@pytest.mark.parametrize("name", ["../x", "%2e%2e", "%2e%2e%2fx", "a/b", "..", ".", "-x", "x" * 65, "a%00b", "ä"])
def test_unsafe_collection_names(client: httpx.Client, server: Server, name: str) -> None:
    r = client.put(f"/collections/{name}", json={"dim": 4})
    assert r.status_code in (400, 404, 405, 422), (name, r.status_code, r.text)
    root = server.data_dir / "collections"
    assert all(p.parent == root for p in root.iterdir())
    assert not (server.data_dir / "x").exists() and not (server.data_dir.parent / "x").exists()


def test_empty_collection_name(client: httpx.Client) -> None:
    r = client.put("/collections/", json={"dim": 4}, follow_redirects=True)  # 307 to /collections
    assert_error(r, 405)


def test_invalid_utf8_body(client: httpx.Client, col: str) -> None:
    body = b'{"points": [{"id": "\xff\xfe", "vector": [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}]}'
    r = client.put(f"/collections/{col}/points", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert_error(r, 400)
    r = client.post(f"/collections/{col}/search", content=b'{"text": "\xc3\x28"}',
                    headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


def test_one_megabyte_text(server: Server) -> None:
    """A 1 MB text is encoded (truncated at the model's 256 tokens), not refused or crashed on."""
    with server.client() as c:
        assert c.put("/collections/longtext", json={"encoder": "minilm"}).status_code in (200, 201)
        text = ("retrieval of long documents " * 40_000)[: 2**20 - 200]
        r = c.put("/collections/longtext/points", json={"points": [{"id": 1, "text": text}]})
        assert r.status_code in (200, 413), r.text  # 413 when the server's body limit is 1 MiB
        r = c.post("/collections/longtext/search", json={"text": text[:500_000], "k": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_wrong_content_types(client: httpx.Client, col: str, content_type: str) -> None:
    before = count(client, col)
    r = client.put(f"/collections/{col}/points", content=b"points=1", headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert_error(r, r.status_code)
    r = client.post(f"/collections/{col}/search", content=b"<q/>", headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert count(client, col) == before


def test_ndjson_with_a_truncated_last_line(client: httpx.Client, col: str) -> None:
    lines = [json.dumps({"id": f"nd{i}", "vector": [0.3] * DIM, "payload": {"i": i}}) for i in range(10)]
    body = ("\n".join(lines) + "\n" + lines[0][: len(lines[0]) // 2]).encode()  # cut mid-object, no newline
    job = client.post(f"/collections/{col}/ingest", content=body).json()
    for _ in range(200):
        state = client.get(f"/jobs/{job['job_id']}").json()
        if state["state"] != "running":
            break
        time.sleep(0.05)
    assert state["state"] == "completed" and state["points_committed"] == 10, state
    assert [e["line"] for e in state["errors"]] == [11], state
    assert client.get(f"/collections/{col}/points/nd9").json()["payload"] == {"i": 9}


# -- full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs: a real ENOSPC. Needs root (CI and these machines run as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (needs root): {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_clearly_and_corrupts_nothing(small_disk: Path, models_dir: Path) -> None:
    logs = small_disk.parent  # not on the full disk
    srv = Server(small_disk / "data", models_dir, "--encoder", "", log_dir=logs).start()
    dim = 256
    rng = np.random.default_rng(0)
    acknowledged: dict[int, list[float]] = {}
    try:
        with srv.client() as c:
            assert c.put("/collections/ballast", json={"dim": dim}).status_code == 201
            ballast = [{"id": i, "vector": rng.standard_normal(dim).tolist()} for i in range(500)]
            assert c.put("/collections/ballast/points", json={"points": ballast}).status_code == 200
            assert c.put("/collections/full", json={"dim": dim}).status_code == 201
            status, start = 200, 0
            while status == 200:
                vectors = rng.standard_normal((200, dim)).astype(np.float32)
                points = [{"id": start + i, "vector": v.tolist(), "payload": {"n": start + i}}
                          for i, v in enumerate(vectors)]
                r = c.put("/collections/full/points", json={"points": points})
                status = r.status_code
                if status == 200:
                    acknowledged.update({p["id"]: p["vector"] for p in points})
                    start += 200
                assert start < 100_000, "the disk never filled"
            err = assert_error(r, 507, "storage_full")
            assert "no space left" in err["message"] and "free space" in err["message"], err
            assert count(c, "full") == len(acknowledged)
            # a job on the full disk: refused at once, or failed with the same clear message
            body = "".join(json.dumps({"id": 10**6 + i, "vector": [0.1] * dim}) + "\n" for i in range(3000))
            r = c.post("/collections/full/ingest", content=body.encode())
            if r.status_code == 202:
                job_id = r.json()["job_id"]
                deadline = time.monotonic() + 60
                while (job := c.get(f"/jobs/{job_id}").json())["state"] == "running":
                    assert time.monotonic() < deadline, job
                    time.sleep(0.05)
                assert job["state"] == "failed" and "no space left" in job["message"], job
            else:
                assert_error(r, 507, "storage_full")
            assert_searchable(c, acknowledged, dim)
        srv.stop_cleanly()
        # restart on the still-full disk: everything acknowledged is there, nothing else
        srv = Server(small_disk / "data", models_dir, "--encoder", "", log_dir=logs).start()
        with srv.client() as c:
            assert c.get("/collections").json()["unavailable"] == {}
            assert count(c, "full") == len(acknowledged) + (job["points_committed"] if r.status_code == 202 else 0)
            assert_searchable(c, acknowledged, dim)
            # free space: writes work again
            assert c.delete("/collections/ballast").status_code == 200
            more = [{"id": 10**7, "vector": [0.5] * dim}]
            assert c.put("/collections/full/points", json={"points": more}).status_code == 200
    finally:
        srv.stop()


def assert_searchable(c: httpx.Client, acknowledged: dict[int, list[float]], dim: int) -> None:
    for pid in list(acknowledged)[:: max(1, len(acknowledged) // 5)]:
        hits = c.post("/collections/full/search", json={"vector": acknowledged[pid], "k": 1}).json()["hits"]
        assert hits[0]["id"] == pid and hits[0]["payload"] == {"n": pid}


# -- damaged files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["catalog", "vectors", "service.json"])
def test_damaged_collection_is_reported_and_the_others_serve(tmp_path: Path, models_dir: Path, damage: str) -> None:
    data = tmp_path / "data"
    srv = Server(data, models_dir, "--encoder", "").start()
    with srv.client() as c:
        for name in ("good", "bad"):
            assert c.put(f"/collections/{name}", json={"dim": DIM}).status_code == 201
            points = [{"id": i, "vector": [float(i + 1)] * DIM} for i in range(100)]
            assert c.put(f"/collections/{name}/points", json={"points": points}).status_code == 200
    srv.stop_cleanly()
    folder = data / "collections" / "bad"
    if damage == "catalog":
        (folder / "index" / "catalog.sqlite").write_bytes(b"this is not a database" * 100)
    elif damage == "vectors":
        vectors = next((folder / "index").glob("vectors*"))
        os.truncate(vectors, vectors.stat().st_size // 2)
    else:
        (folder / "service.json").write_text("{not json")
    srv = Server(data, models_dir, "--encoder", "").start()
    try:
        with srv.client() as c:
            listed = c.get("/collections").json()
            assert [x["name"] for x in listed["collections"]] == ["good"]
            assert "bad" in listed["unavailable"], listed
            err = assert_error(c.post("/collections/bad/search", json={"vector": [1.0] * DIM}), 503,
                               "collection_unavailable")
            assert "backup" in err["message"] and "DELETE" in err["message"]
            assert_error(c.put("/collections/bad", json={"dim": DIM}), 503)  # never silently replaced
            assert folder.exists()
            assert c.post("/collections/good/search", json={"vector": [1.0] * DIM}).status_code == 200
            assert c.delete("/collections/bad").status_code == 200
            assert not folder.exists()
            assert c.put("/collections/bad", json={"dim": DIM}).status_code == 201
        assert "cannot be opened" in srv.log()
    finally:
        srv.stop()


# -- security -------------------------------------------------------------------------------------
API_KEY = "reliability-key-0123456789"
OPEN = {"/livez", "/readyz", "/metrics"}


def _routes() -> list[tuple[str, str]]:
    app = create_app(Settings(encoder=None))
    found = []
    for path, item in app.openapi()["paths"].items():
        for method in item:
            found.append((method.upper(), path))
    return sorted(found)


ROUTES = _routes()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("keyed") / "data", models_dir, "--encoder", "",
                 env={"TANDEM_API_KEY": API_KEY}).start()
    yield srv
    srv.stop_cleanly()


def test_every_route_is_listed() -> None:
    assert len(ROUTES) >= 12 and {p for _, p in ROUTES} >= OPEN


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_api_key_on_every_route_but_health_and_metrics(keyed_server: Server, method: str, path: str) -> None:
    url = path.replace("{name}", "secured").replace("{point_id}", "1").replace("{job_id}", "nojob") \
        .replace("{key}", "k").replace("{field_name}", "k")
    with keyed_server.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong-key-but-long"}, {"Authorization": API_KEY}):
            r = c.request(method, url, json={}, headers=headers)
            if path in OPEN:
                assert r.status_code == 200, (method, path, r.text)
            elif path.startswith("/v1/"):  # the OpenAI dialect answers in OpenAI's shape
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            elif path.startswith("/qdrant"):  # and the Qdrant one in Qdrant's
                assert r.status_code == 401 and "API key" in r.json()["status"]["error"], r.text
            else:
                assert_error(r, 401, "unauthorized")
        r = c.request(method, url, json={}, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code != 401, (method, path)


def test_key_and_payloads_never_logged(keyed_server: Server) -> None:
    secret_payload = "payload-secret-7f3a9c"
    secret_text = "query-secret-5b2e1d"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with keyed_server.client(headers=auth) as c:
        assert c.put("/collections/logs", json={"dim": DIM}).status_code == 201
        good = [{"id": 1, "vector": [0.1] * DIM, "payload": {"s": secret_payload}}]
        assert c.put("/collections/logs/points", json={"points": good}).status_code == 200
        bad = [{"id": 2, "vector": [0.1] * (DIM + 1), "payload": {"s": secret_payload}}]
        assert c.put("/collections/logs/points", json={"points": bad}).status_code == 422
        c.post("/collections/logs/search", json={"text": secret_text})  # no encoder: 4xx, logged as such
        line = json.dumps({"id": 3, "payload": {"s": secret_payload}}).encode()  # no vector: a bad line
        job = c.post("/collections/logs/ingest", content=line)
        deadline = time.monotonic() + 30
        while c.get(f"/jobs/{job.json()['job_id']}").json()["state"] == "running":  # its bad line is logged
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with keyed_server.client() as c:  # wrong keys, including one that looks like the real one
        c.get("/collections", headers={"Authorization": f"Bearer {API_KEY[:-1]}X"})
    log = keyed_server.log()
    for secret in (API_KEY, API_KEY[:-1], secret_payload, secret_text):
        assert secret not in log, f"{secret!r} appears in the server log"


# -- overload -------------------------------------------------------------------------------------
def test_past_max_in_flight_requests_are_refused_at_once_but_probes_answer(tmp_path: Path, models_dir: Path) -> None:
    import asyncio

    srv = Server(tmp_path / "data", models_dir, "--max-in-flight", "2", "--max-queue-delay-ms", "0",
                 "--encoder-threads", "1").start()
    try:
        with srv.client() as c:
            assert c.put("/collections/busy", json={"encoder": "minilm"}).status_code == 201
        slow = {"searches": [{"text": f"a long enough query about item {i} " * 10, "k": 3} for i in range(64)]}

        async def burst() -> tuple[list[httpx.Response], list[int]]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as ac:
                searches = [ac.post("/collections/busy/search/batch", json=slow) for _ in range(8)]
                probes = [ac.get(p) for p in ("/livez", "/readyz", "/metrics")]
                done = await asyncio.gather(*searches, *probes)
            return list(done[:8]), [r.status_code for r in done[8:]]

        answers, probes = asyncio.run(burst())
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}, statuses
        err = assert_error(next(r for r in answers if r.status_code == 429), 429, "overloaded")
        assert "--max-in-flight" in err["message"]
        assert probes == [200, 200, 200]
    finally:
        srv.stop_cleanly()
