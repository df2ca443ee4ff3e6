"""Restarts: data survives, SIGTERM drains in-flight requests, a crashed ingestion job resumes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.server import Server

pytestmark = pytest.mark.slow

WORDS = ("river", "mountain", "bread", "violin", "engine", "garden", "storm", "library", "planet", "coffee")


def texts(n: int) -> list[str]:
    return [f"{WORDS[i % 10]} {WORDS[(i * 7) % 10]} number {i} in a sentence about {WORDS[(i * 3) % 10]}"
            for i in range(n)]


def test_restart_crash_and_drain(tmp_path: Path, models_dir: Path) -> None:
    data = tmp_path / "data"
    flags = ("--ingest-chunk-points", "50", "--encoder-threads", "1")

    # 1. Data, then a crash (SIGKILL) in the middle of an ingestion job.
    srv = Server(data, models_dir, *flags).start()
    with srv.client() as c:
        assert c.put("/collections/docs", json={"encoder": "minilm"}).status_code == 201
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((200, 384)).astype(np.float32)
        for start in range(0, 200, 100):
            points = [{"id": i, "vector": vecs[i].tolist(), "payload": {"i": i}} for i in range(start, start + 100)]
            assert c.put("/collections/docs/points", json={"points": points}).status_code == 200
        r = c.put("/collections/docs/points", json={"points": [{"id": "t", "text": "violin concerto"}]})
        assert r.status_code == 200
        before = c.post("/collections/docs/search", json={"text": "music instrument", "k": 5}).json()["hits"]
        body = "".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(texts(3000))).encode()
        job_id = c.post("/collections/docs/ingest", content=body).json()["job_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["points_committed"] < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL

    # 2. Restart: the data is there, and the job resumes where its last recorded chunk ended.
    srv = Server(data, models_dir, *flags).start()
    with srv.client() as c:
        deadline = time.monotonic() + 120
        while (job := c.get(f"/jobs/{job_id}").json())["state"] == "running":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["state"] == "completed" and "resumed" in job["message"], job
        assert job["points_committed"] == 3000 and job["lines_read"] == 3000, job
        count = c.get("/collections/docs").json()["points"]
        assert count == 201 + 3000
        assert c.get("/collections/docs/points/x2999").json()["payload"] is None
        assert c.get("/collections/docs/points/7").json()["payload"] == {"i": 7}
        after = c.post("/collections/docs/search", json={"text": "music instrument", "k": 5}).json()["hits"]
        assert [h["id"] for h in before][:1] == ["t"]
        assert "t" in [h["id"] for h in after]  # beside the resumed job's texts about violins

        # 3. SIGTERM while requests are in flight: they complete, then the server stops.
        results: list[Any] = []
        done: list[float] = []
        clients = [httpx.Client(base_url=srv.url, timeout=60) for _ in range(6)]
        for cl in clients:  # connect first: after SIGTERM the server accepts no new connection
            assert cl.get("/livez").status_code == 200
        batch = {"searches": [{"text": t, "k": 3} for t in texts(64)]}

        def slow_request(cl: httpx.Client) -> None:
            try:
                results.append(cl.post("/collections/docs/search/batch", json=batch).status_code)
                done.append(time.monotonic())
            except httpx.HTTPError as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=slow_request, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        time.sleep(0.5)  # 6 x 64 texts on one encoder thread: seconds of work in flight
    sigterm_at = time.monotonic()
    srv.stop_cleanly()
    for t in threads:
        t.join()
    for cl in clients:
        cl.close()
    assert results == [200] * 6, results
    assert max(done) > sigterm_at, "no request was in flight at SIGTERM: make them slower"

    # 4. And once more: everything still there.
    srv = Server(data, models_dir, *flags).start()
    with srv.client() as c:
        assert c.get("/collections/docs").json()["points"] == count
        again = c.post("/collections/docs/search", json={"text": "music instrument", "k": 5}).json()["hits"]
        assert [h["id"] for h in again] == [h["id"] for h in after]
    srv.stop_cleanly()
