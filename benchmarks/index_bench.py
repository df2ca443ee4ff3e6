"""Two-stage index benchmark on real MiniLM embeddings of the 117,659 WordNet glosses.

For each coarse kind and oversampling: recall@10 against exact search, single-query p50/p99,
batch queries/s, RAM of the coarse stage per vector, rows and bytes read from disk per query,
build time; the rerank with a warm and with a cold page cache; then the same at 1M vectors
(the glosses plus noisy copies of them).

    python -m benchmarks.index_bench [--scale-1m] [--queries 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, machine, write_result
from index import Collection, CollectionConfig
from index.coarse import BinaryCoarse

IVF_ROWS = BinaryCoarse.IVF_ROWS

OVERSAMPLING = [1, 2, 4, 8, 10, 16, 32]
SETTINGS: dict[str, dict[str, Any]] = {
    "binary": {"coarse": "binary"},  # mean-centred signs, asymmetric rescoring (the default)
    "binary-sign": {"coarse": "binary", "binary_transform": "sign"},
    "binary-rotate": {"coarse": "binary", "binary_transform": "rotate"},
    "binary-hamming-only": {"coarse": "binary", "shortlist_factor": 1.0},
    "binary-ivf": {"coarse": "binary", "ivf_rows": 0},  # the inverted file forced on, to find the threshold
    "pq": {"coarse": "pq"},
    "flat": {"coarse": "flat"},
}


def split(vectors: np.ndarray, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(vectors))
    return vectors[order[n_queries:]], vectors[order[:n_queries]]


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ base.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


def build(path: Path, config: CollectionConfig, base: np.ndarray, batch: int = 50_000) -> tuple[Collection, float]:
    t0 = time.perf_counter()
    col = Collection.create(path, config)
    for start in range(0, len(base), batch):
        col.upsert(list(range(start, min(start + batch, len(base)))), base[start : start + batch])
    return col, time.perf_counter() - t0


def recall(truth: np.ndarray, hits: list[list[Any]], k: int = 10) -> float:
    found = [len(set(t[:k].tolist()) & {h.id for h in r[:k]}) / k for t, r in zip(truth, hits, strict=True)]
    return float(np.mean(found))


def latency(col: Collection, queries: np.ndarray, *, cold: bool = False, **kwargs: Any) -> dict[str, float]:
    times = []
    for q in queries:
        if cold:
            col._dense.evict()  # noqa: SLF001 - benchmark reaches in to empty the page cache
        t0 = time.perf_counter()
        col.search(q, 10, with_payload=False, **kwargs)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def measure(
    col: Collection, queries: np.ndarray, truth: np.ndarray, oversampling: float, n_latency: int
) -> dict[str, Any]:
    found = col.search(queries, 10, oversampling=oversampling, with_payload=False)
    t0 = time.perf_counter()
    col.search(queries, 10, oversampling=oversampling, with_payload=False)
    qps = len(queries) / (time.perf_counter() - t0)
    rows_read = col.search_detailed(queries[:1], 10, oversampling=oversampling).candidates
    return {
        "oversampling": oversampling,
        "recall_at_10": recall(truth, found),
        **latency(col, queries[:n_latency], oversampling=oversampling),
        "batch_qps": qps,
        "rows_read_per_query": rows_read,
        "bytes_read_per_query": rows_read * col.config.dim * 4,
    }


def run_scale(name: str, base: np.ndarray, queries: np.ndarray, settings: dict[str, dict[str, Any]],
              oversampling: list[float], n_latency: int, workdir: Path) -> dict[str, Any]:
    truth = exact_top(base, queries, 10)
    out: dict[str, Any] = {"points": len(base), "queries": len(queries), "kinds": {}}
    for label, setting in settings.items():
        extra = dict(setting)
        BinaryCoarse.IVF_ROWS = extra.pop("ivf_rows", IVF_ROWS)
        config = CollectionConfig(dim=base.shape[1], **extra)
        col, build_s = build(workdir / f"{name}-{label}", config, base)
        stats = col.stats()
        entry: dict[str, Any] = {
            "config": config.model_dump(exclude_none=True),
            "build_s": build_s,
            "coarse_ram_bytes_per_vector": stats.ram_bytes / stats.points,
            "disk_bytes_per_vector": stats.disk_bytes / stats.points,
            "runs": [],
        }
        for o in [1] if label == "flat" else oversampling:
            run = measure(col, queries, truth, o, n_latency)
            entry["runs"].append(run)
            print(f"{name} {label:20s} os={o:<4} recall={run['recall_at_10']:.4f} p50={run['p50_ms']:.2f}ms "
                  f"p99={run['p99_ms']:.2f}ms qps={run['batch_qps']:.0f}", flush=True)
        if label in ("binary", "binary-flat-scan"):
            entry["cold"] = {}
            for o in (4, 10):
                for prefetch in (True, False):
                    col._dense.prefetch = prefetch  # noqa: SLF001
                    key = f"os{o}-{'prefetch' if prefetch else 'one-by-one'}"
                    entry["cold"][key] = latency(col, queries[: n_latency // 3], cold=True, oversampling=o)
                    print(f"{name} cold {key}: {entry['cold'][key]}", flush=True)
                col._dense.prefetch = True  # noqa: SLF001
        if label == "binary" and col._coarse._ivf is not None:  # noqa: SLF001 - tuning the inverted file
            coarse = col._coarse  # noqa: SLF001
            default = coarse.nprobe
            entry["nprobe_sweep"] = {"nlist": coarse._ivf.nlist, "default": default, "runs": []}  # noqa: SLF001
            for nprobe in sorted({default // 8, default // 4, default // 2, default}):
                coarse.nprobe = nprobe
                run = {"nprobe": nprobe, **measure(col, queries, truth, 16, n_latency)}
                entry["nprobe_sweep"]["runs"].append(run)
                print(f"{name} nprobe={nprobe} os=16 recall={run['recall_at_10']:.4f} p50={run['p50_ms']:.2f}ms")
            coarse.nprobe = default
        out["kinds"][label] = entry
        col.close()
        shutil.rmtree(workdir / f"{name}-{label}")
    return out


def noisy_copies(base: np.ndarray, total: int, seed: int = 1) -> np.ndarray:
    """``base`` followed by perturbed copies of its rows up to ``total`` rows, unit norm."""
    rng = np.random.default_rng(seed)
    extra = total - len(base)
    out = np.empty((total, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for start in range(0, extra, 100_000):
        n = min(100_000, extra - start)
        x = base[rng.integers(0, len(base), n)] + rng.standard_normal((n, base.shape[1]), dtype=np.float32) * 0.03
        out[len(base) + start : len(base) + start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s in ("117k", "1m") if s in result]
    fig, axes = plt.subplots(1, len(scales), figsize=(7 * len(scales), 5), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=False):
        for label, entry in result[scale]["kinds"].items():
            runs = entry["runs"]
            ax.plot([r["p50_ms"] for r in runs], [r["recall_at_10"] for r in runs], "o-", label=label)
        ax.axhline(0.99, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("single-query p50 latency (ms, warm cache)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{result[scale]['points']:,} MiniLM vectors, oversampling 1-32")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--scale-1m", action="store_true", help="also run at 1M vectors (several minutes)")
    parser.add_argument("--workdir", type=Path, default=None, help="where collections are built (a real disk)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tandem-bench-", dir=os.environ.get("TMPDIR")))
    base, queries = split(gloss_embeddings(), args.queries)
    result: dict[str, Any] = {"machine": machine(), "faiss_threads_per_search": 1}
    result["117k"] = run_scale("117k", base, queries, SETTINGS, OVERSAMPLING, args.latency_queries, workdir)
    if args.scale_1m:
        big = noisy_copies(base, 1_000_000)
        wanted = {
            "binary-flat-scan": {"coarse": "binary", "ivf_rows": 10**9},
            "binary": SETTINGS["binary"],
            "pq": SETTINGS["pq"],
        }
        result["1m"] = run_scale("1m", big, queries[:300], wanted, [4, 10, 16, 32], args.latency_queries, workdir)
    path = write_result("index", result)
    plot(result, RESULTS / "index.png")
    print(f"wrote {path} and {RESULTS / 'index.png'}")


if __name__ == "__main__":
    main()
