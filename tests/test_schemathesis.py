"""Generated requests from the service's own OpenAPI schema (schemathesis): no 5xx, and every
response conforms to the schema (status, content type, body).

A server with the MiniLM encoder and a `docs` collection (the name the schema gives as its
example, so generated requests reach past the 404s) is fuzzed through every operation by the
schemathesis command line; `TANDEM_FUZZ_EXAMPLES` sets the examples per operation (default 80:
over 1,000 requests in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server import Server

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance"


def test_generated_requests_get_no_5xx_and_conform_to_the_schema(tmp_path: Path, models_dir: Path) -> None:
    srv = Server(tmp_path / "data", models_dir, "--max-body-bytes", str(2**20)).start()
    try:
        with srv.client() as c:
            assert c.put("/collections/docs", json={"encoder": "minilm"}).status_code == 201
            vectors = np.random.default_rng(0).standard_normal((50, 384))
            points = [{"id": i, "vector": v.tolist(), "payload": {"i": i}} for i, v in enumerate(vectors)]
            assert c.put("/collections/docs/points", json={"points": points}).status_code == 200
        report = tmp_path / "report.json"
        examples = os.environ.get("TANDEM_FUZZ_EXAMPLES", "80")
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{srv.url}/openapi.json", "--checks", CHECKS,
             "--max-examples", examples, "--seed", "1", "--workers", "1", "--request-timeout", "60",
             "--report", "json", "--report-json-path", str(report), "--no-color"],
            capture_output=True, text=True, timeout=1200,
        )
        output = done.stdout[-6000:] + done.stderr[-3000:]
        assert done.returncode == 0, output
        assert "Server error" not in srv.log(), srv.log()[-3000:]
        requests = _requests(report, output)
        assert requests >= (1000 if examples == "80" else 1), output
    finally:
        srv.stop_cleanly()


def _requests(report: Path, output: str) -> int:
    """How many requests schemathesis sent, from its JSON report."""
    data = json.loads(report.read_text())
    found = [v for k, v in _walk(data) if k in ("total_requests", "requests", "cases", "total")
             and isinstance(v, int)]
    assert found, f"no request count in {report.name}: {list(data)[:20]}\n{output}"
    return max(found)


def _walk(node: object) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((k, v))
            out += _walk(v)
    elif isinstance(node, list):
        for v in node:
            out += _walk(v)
    return out
