"""Generated requests from the service's own OpenAPI schema (schemathesis): no 5xx, and every
response conforms to the schema (status, content type, body).

A server with the MiniLM encoder and a `docs` collection (the name the schema gives as its
example, so generated requests reach past the 404s) is fuzzed through every operation by the
schemathesis command line; `TANDEM_FUZZ_EXAMPLES` sets the examples per operation of the fuzzing
phase (default 30; with the coverage phase's boundary cases, some 20,000 requests in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.server import REPO_ROOT, Server

pytestmark = pytest.mark.slow

#: Bodies that carry only vectors, whose length is the collection's: no static schema can say it.
#: (tandem's own search and upsert also take `text`, and generated texts are served.)
DIMENSION_BOUND = {
    "PUT /qdrant/collections/{name}/points",
    "POST /qdrant/collections/{name}/points/search",
    "POST /qdrant/collections/{name}/points/query",
}
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance"


def test_generated_requests_get_no_5xx_and_conform_to_the_schema(tmp_path: Path, models_dir: Path) -> None:
    srv = Server(tmp_path / "data", models_dir, "--max-body-bytes", str(2**20)).start()
    try:
        examples = os.environ.get("TANDEM_FUZZ_EXAMPLES", "30")
        generated = 0
        for run, extra in (
            # random names: mostly 404s and the validation in front of them (the coverage phase's
            # boundary bodies run in the second pass, where they reach the index)
            ("any-name", ["--phases", "examples,fuzzing,stateful"]),
            # every {name} = docs (no DELETE, so it stays): bodies reach validation and the index
            # (no PUT /collections/{name} either: it could only answer 409 or 422 for an existing name)
            ("docs", ["--exclude-method", "DELETE",
                      "--exclude-operation-id", "create_collection_collections__name__put"]),
        ):
            with srv.client() as c:  # afresh: the first pass may have dropped or replaced it ("docs" is the example)
                c.delete("/collections/docs")
                assert c.put("/collections/docs", json={"encoder": "minilm"}).status_code == 201
                vectors = np.random.default_rng(0).standard_normal((50, 384))
                points = [{"id": i, "vector": v.tolist(), "payload": {"i": i}} for i, v in enumerate(vectors)]
                assert c.put("/collections/docs/points", json={"points": points}).status_code == 200
            report = tmp_path / f"report-{run}.json"
            config = ["--config-file", str(REPO_ROOT / "tests" / "schemathesis-docs.toml")] if run == "docs" else []
            done = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", *config, "run", f"{srv.url}/openapi.json",
                 "--checks", CHECKS, "--max-examples", examples, "--seed", "1", "--workers", "1",
                 "--request-timeout", "60", "--report", "json", "--report-json-path", str(report),
                 "--no-color", *extra],
                capture_output=True, text=True, timeout=1200, cwd=REPO_ROOT,
                env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks"},
            )
            output = done.stdout[-6000:] + done.stderr[-3000:]
            assert done.returncode == 0, output
            data = json.loads(report.read_text())
            assert data["test_cases"]["with_failures"] == 0 and data["operations"]["errored"] == 0, output
            # The schema documents what validation enforces: no operation rejects most of what is
            # generated from it, but those whose vectors must have the collection's dimension.
            # (Checked where every name is the `docs` collection: with random names, a body meets
            # whatever collection an earlier generated request created, of any dimension.)
            if run == "docs":
                assert set(data["warnings"]["validation_mismatch"]) <= DIMENSION_BOUND, output
            generated += data["test_cases"]["generated"]
        server_errors = [x for x in srv.log().splitlines() if '"status": 5' in x and '"route": "/readyz"' not in x]
        assert not server_errors, server_errors[:5]  # (/readyz says 503 while the server starts)
        assert generated >= (1000 if examples == "30" else 1), generated
    finally:
        srv.stop_cleanly()

