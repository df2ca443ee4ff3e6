"""SIGKILL during concurrent ingestion, again and again: nothing acknowledged is lost.

A few rounds here (``TANDEM_CRASH_KILLS``, default 4); ``python -m benchmarks.crash_bench``
runs the long version and records it in benchmarks/results/crash.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.crash_harness import CrashHarness

pytestmark = pytest.mark.slow


def test_sigkill_during_ingestion_loses_nothing_acknowledged(tmp_path: Path, models_dir: Path) -> None:
    harness = CrashHarness(tmp_path / "data", models_dir, seed=7)
    for _ in range(int(os.environ.get("TANDEM_CRASH_KILLS", "4"))):
        harness.round()
    summary = harness.final_check(tmp_path)
    assert summary["batches_acknowledged"] > 0 and summary["batches_cut_off_by_the_kill"] > 0, summary
