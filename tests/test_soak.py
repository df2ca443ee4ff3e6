"""A short soak (the long one: `python -m benchmarks.soak_bench`): a separate process drives the
mix of text and vector searches, upserts and an ingestion job at 80% of the capacity it measured,
then at 3x: every answer is a 200 or a deliberate 429, none is a 5xx, a timeout or a dropped
connection, and the ingestion job completes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server import REPO_ROOT

pytestmark = pytest.mark.slow


def test_short_soak_and_overload_answer_every_request() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak_bench", "--synthetic", "3000", "--minutes", "0.3",
         "--calibrate-s", "4", "--overload-s", "4", "--no-write"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SOAK-RESULT "))
    result = json.loads(line.removeprefix("SOAK-RESULT "))
    soak, overload = result["soak"], result["overload"]
    assert soak["requests"] > 0 and soak["statuses"].get("200", 0) > 0, soak
    assert set(soak["statuses"]) <= {"200", "429"}, soak["statuses"]
    assert overload["requests"] > 0 and set(overload["statuses"]) <= {"200", "429"}, overload["statuses"]
    assert soak["ingest_jobs"]["states"] == {"completed": soak["ingest_jobs"]["sent"]}, soak["ingest_jobs"]
