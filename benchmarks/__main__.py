"""Run every benchmark in turn: ``python -m benchmarks`` (or ``./dev bench``).

Each writes ``benchmarks/results/<name>.json`` and ``.png``. Run them on an otherwise idle
machine: they measure time.
"""

from __future__ import annotations

import runpy
import sys

MODULES = ["encoder_bench", "index_bench", "filter_bench", "multivector_bench", "service_bench", "compat_bench",
           "soak_bench", "crash_bench"]


def main() -> None:
    only = sys.argv[1:] or MODULES
    for name in only:
        print(f"== benchmarks.{name}", flush=True)
        sys.argv = [f"benchmarks.{name}"] + (["--growth", "--ingest", "--small"] if name == "index_bench" else [])
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
