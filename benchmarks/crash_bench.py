"""The crash harness (tests/crash_harness.py) for many rounds: SIGKILL at a random moment during
concurrent synchronous upserts, NDJSON jobs and searches, restart, check.

    python -m benchmarks.crash_bench [--kills 25] [--seed 0]

Writes benchmarks/results/crash.json: kills survived, batches acknowledged and cut off, how the
cut-off ones were found (whole or absent), jobs resumed, restart times.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.corpora import machine, models_dir, write_result
from tests.crash_harness import CrashHarness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tandem-crash-") as tmp:
        harness = CrashHarness(Path(tmp) / "data", models_dir(), seed=args.seed)
        for i in range(args.kills):
            harness.round()
            print(f"kill {i + 1}/{args.kills}: {harness.report.summary()}", flush=True)
        summary = harness.final_check(Path(tmp))
    result = {"summary": summary, "seconds": time.perf_counter() - t0, "machine": machine(), "seed": args.seed}
    print(json.dumps(summary, indent=2))
    write_result("crash", result)


if __name__ == "__main__":
    main()
