"""A real Prometheus server scrapes /metrics and answers tandem's series through its query API."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import Server, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def prometheus(tmp_path: Path, server: Server) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the `prometheus` binary is not on PATH: run ./dev test, which installs the Debian package")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: tandem\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_tandem(prometheus: str, client: httpx.Client, tmp_path: Path) -> None:
    client.put("/collections/scraped", json={"dim": 4})
    client.put("/collections/scraped/points", json={"points": [{"id": 1, "vector": [1, 0, 0, 0]}]})
    client.post("/collections/scraped/search", json={"vector": [1, 0, 0, 0]})
    deadline = time.monotonic() + 60
    series: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            series = query(prometheus, "tandem_requests_total")
            stages = query(prometheus, 'tandem_search_stage_duration_seconds_count{stage="rerank"}')
            if series and stages:
                break
        except httpx.HTTPError:
            pass  # Prometheus still starting
        time.sleep(0.5)
    else:
        log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"Prometheus never returned tandem's series; its log:\n{log}")
    routes = {s["metric"]["route"] for s in series}
    assert "/collections/{name}/search" in routes, routes
    assert all(s["metric"]["job"] == "tandem" for s in series)
    up = query(prometheus, 'up{job="tandem"}')
    assert up and up[0]["value"][1] == "1"
    points = query(prometheus, 'tandem_points{collection="scraped"}')
    assert points and points[0]["value"][1] == "1"
    assert query(prometheus, "process_resident_memory_bytes")
