"""The two-stage index against HNSW, on real MiniLM vectors, in the same run (issue 16).

Corpora: the 117,659 WordNet glosses, 178,934 npm package summaries, and a 1M set (both corpora
plus noisy copies of them). 1,000 held-out queries each (500 + 500 at 1M), recall@10 against exact
search, single queries on one thread, warm page cache unless said.

- tandem (``Collection.search``, the whole path: coarse stage, rerank from the disk file, ids):
  nprobe x oversampling sweeps, RAM per vector, build time, cold-cache p50, 2-thread QPS, the time
  of each stage at oversampling 1; ``bits`` 2 and 4 beside the default 1.
- peers: faiss ``IndexHNSWFlat`` and hnswlib, M=32, efConstruction=200, ef swept.
- growth: tandem's default p50 at 100k, 250k, 500k and 1M.
- ingestion: search latency while 200k vectors are upserted, against idle.

    python -m benchmarks.index_bench [--corpus glosses npm 1m] [--growth] [--ingest] [--no-peers]

Results are merged into ``benchmarks/results/index.json`` (one key per part), plotted in index.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, machine, npm_embeddings, write_result
from index import Collection, CollectionConfig
from index.coarse import IVFCoarse

NPROBES = [32, 64, 128, 256]
OVERSAMPLING = [4, 8, 16, 32]
EF = [16, 32, 64, 128, 256]


# -- data -----------------------------------------------------------------------------------------
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


def noisy_copies(base: np.ndarray, total: int, seed: int = 1, *, sources: list[np.ndarray] | None = None) -> np.ndarray:
    """``base`` followed by perturbed copies of its rows up to ``total`` rows, unit norm.
    ``sources``, if given, receives the base row each copy was made from (in chunks)."""
    rng = np.random.default_rng(seed)
    extra = total - len(base)
    out = np.empty((total, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for start in range(0, extra, 100_000):
        n = min(100_000, extra - start)
        source = rng.integers(0, len(base), n)
        if sources is not None:
            sources.append(source)
        x = base[source] + rng.standard_normal((n, base.shape[1]), dtype=np.float32) * 0.03
        out[len(base) + start : len(base) + start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def corpus(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(base, queries)`` of a corpus; the queries are held out of the base."""
    if name == "glosses":
        return split(gloss_embeddings(), 1000)
    if name == "npm":
        return split(npm_embeddings(), 1000)
    if name == "1m":
        gb, gq = split(gloss_embeddings(), 1000)
        nb, nq = split(npm_embeddings(), 1000)
        real = np.concatenate([gb, nb])
        return noisy_copies(real, 1_000_000), np.concatenate([gq[:500], nq[:500]])
    raise ValueError(name)


# -- measuring ------------------------------------------------------------------------------------
def recall(truth: np.ndarray, found: list[list[int]], k: int = 10) -> float:
    return float(np.mean([len(set(t[:k].tolist()) & set(f[:k])) / k for t, f in zip(truth, found, strict=True)]))


def timed(fn: Any, queries: np.ndarray) -> dict[str, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def qps_two_threads(fn: Any, queries: np.ndarray) -> float:
    """Single-query searches from 2 threads at once (one per core), queries per second."""
    halves = [queries[0::2], queries[1::2]]
    workers = [threading.Thread(target=lambda h=h: [fn(q) for q in h]) for h in halves]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(queries) / (time.perf_counter() - t0)


def build(path: Path, config: CollectionConfig, base: np.ndarray, batch: int = 50_000) -> tuple[Collection, float]:
    """Upsert ``base`` in batches, then wait for background rebuilds: the time until it serves
    from an up-to-date stage."""
    t0 = time.perf_counter()
    col = Collection.create(path, config)
    for start in range(0, len(base), batch):
        col.upsert(list(range(start, min(start + batch, len(base)))), base[start : start + batch])
    col.rebuilds.wait()
    return col, time.perf_counter() - t0


def set_nprobe(col: Collection, nprobe: int) -> None:
    stage = col._coarse  # noqa: SLF001 - the sweep sets the probe depth of the live stage
    assert isinstance(stage, IVFCoarse)
    stage.nprobe_setting = nprobe


def tandem(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, workdir: Path,
           n_latency: int, *, bits: int = 1, sweep: bool = True) -> dict[str, Any]:
    config = CollectionConfig(dim=base.shape[1], bits=bits)
    col, build_s = build(workdir / f"{name}-b{bits}", config, base)
    stage = col._coarse  # noqa: SLF001
    assert isinstance(stage, IVFCoarse)
    stats = col.stats()
    entry: dict[str, Any] = {
        "config": config.model_dump(exclude_none=True), "build_s": build_s, "nlist": stage.nlist,
        "default_nprobe": stage.nprobe, "default_oversampling": config.effective_oversampling,
        "coarse_ram_bytes_per_vector": stage.ram_bytes() / stats.points,
        "collection_ram_bytes_per_vector": stats.ram_bytes / stats.points,
        "disk_bytes_per_vector": stats.disk_bytes / stats.points, "runs": [],
    }
    lat = queries[:n_latency]
    default_nprobe = stage.nprobe
    for nprobe in NPROBES if sweep else [default_nprobe]:
        set_nprobe(col, nprobe)
        for over in OVERSAMPLING if sweep else [config.effective_oversampling]:
            hits = col.search(queries, 10, oversampling=over, with_payload=False)
            run = {"nprobe": nprobe, "oversampling": over, "rows_read": 10 * over,
                   "recall_at_10": recall(truth, [[h.id for h in r] for r in hits]),
                   **timed(lambda q, o=over: col.search(q, 10, oversampling=o, with_payload=False), lat)}
            entry["runs"].append(run)
            print(f"{name} tandem b{bits} nprobe={nprobe} os={over} recall={run['recall_at_10']:.4f} "
                  f"p50={run['p50_ms']:.3f}ms p99={run['p99_ms']:.3f}ms", flush=True)
    set_nprobe(col, default_nprobe)

    def one(q: np.ndarray) -> Any:
        return col.search(q, 10, with_payload=False)

    entry["default"] = {"nprobe": default_nprobe, **timed(one, lat),
                        "recall_at_10": recall(truth, [[h.id for h in r] for r in col.search(queries, 10)]),
                        "qps_2_threads": qps_two_threads(one, queries)}
    # Where one search spends its time at oversampling 1 (the fixed part of the path).
    parts = [col.search_detailed(q, 10, oversampling=1, with_payload=False) for q in lat]
    total = timed(lambda q: col.search(q, 10, oversampling=1, with_payload=False), lat)["p50_ms"]
    entry["oversampling_1"] = {"p50_ms": total,
                               "coarse_p50_ms": float(np.median([p.coarse_s for p in parts]) * 1000),
                               "rerank_p50_ms": float(np.median([p.rerank_s for p in parts]) * 1000)}
    cold = []
    for q in lat[:100]:
        col._dense.evict()  # noqa: SLF001 - the benchmark empties the page cache of the vector file
        t0 = time.perf_counter()
        one(q)
        cold.append(time.perf_counter() - t0)
    entry["default"]["cold_p50_ms"] = float(np.median(cold) * 1000)
    print(f"{name} tandem b{bits} default {entry['default']} build={build_s:.1f}s "
          f"ram={entry['coarse_ram_bytes_per_vector']:.1f}B/vec os1={entry['oversampling_1']}", flush=True)
    col.close()
    shutil.rmtree(workdir / f"{name}-b{bits}")
    return entry


def faiss_hnsw(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, n_latency: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index.add(base)
    entry: dict[str, Any] = {"M": 32, "efConstruction": 200, "build_s": time.perf_counter() - t0,
                             "ram_bytes_per_vector": len(faiss.serialize_index(index)) / len(base), "runs": []}
    faiss.omp_set_num_threads(1)
    for ef in EF:
        index.hnsw.efSearch = ef
        found = index.search(queries, 10)[1].tolist()
        run = {"efSearch": ef, "recall_at_10": recall(truth, found),
               **timed(lambda q: index.search(q[None, :], 10), queries[:n_latency])}
        entry["runs"].append(run)
        print(f"{name} faiss-hnsw ef={ef} recall={run['recall_at_10']:.4f} p50={run['p50_ms']:.3f}ms", flush=True)
    return entry


def hnswlib_peer(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                 n_latency: int) -> dict[str, Any]:
    import hnswlib

    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=32, ef_construction=200, random_seed=1)
    index.add_items(base, num_threads=os.cpu_count() or 1)
    entry: dict[str, Any] = {"M": 32, "efConstruction": 200, "build_s": time.perf_counter() - t0, "runs": []}
    index.set_num_threads(1)
    for ef in EF:
        index.set_ef(ef)
        found = index.knn_query(queries, k=10, num_threads=1)[0].tolist()
        run = {"ef": ef, "recall_at_10": recall(truth, found),
               **timed(lambda q: index.knn_query(q, k=10, num_threads=1), queries[:n_latency])}
        entry["runs"].append(run)
        print(f"{name} hnswlib ef={ef} recall={run['recall_at_10']:.4f} p50={run['p50_ms']:.3f}ms", flush=True)
    return entry


def growth(workdir: Path, n_latency: int) -> dict[str, Any]:
    """tandem's default p50 and recall at 100k..1M rows of the 1M set."""
    big, queries = corpus("1m")
    out: dict[str, Any] = {"runs": []}
    for n in (100_000, 250_000, 500_000, 1_000_000):
        base = big[:n]
        truth = exact_top(base, queries, 10)
        col, build_s = build(workdir / f"growth-{n}", CollectionConfig(dim=base.shape[1]), base)
        stage = col._coarse  # noqa: SLF001
        assert isinstance(stage, IVFCoarse)
        hits = col.search(queries, 10, with_payload=False)
        run = {"points": n, "nlist": stage.nlist, "nprobe": stage.nprobe, "build_s": build_s,
               "recall_at_10": recall(truth, [[h.id for h in r] for r in hits]),
               "coarse_ram_bytes_per_vector": stage.ram_bytes() / n,
               **timed(lambda q, c=col: c.search(q, 10, with_payload=False), queries[:n_latency])}
        out["runs"].append(run)
        print(f"growth {run}", flush=True)
        col.close()
        shutil.rmtree(workdir / f"growth-{n}")
    return out


def small(workdir: Path, n_latency: int) -> dict[str, Any]:
    """Where the exact scan is cheaper than the two stages: p50 of both at small sizes (glosses)."""
    base, queries = corpus("glosses")
    out: dict[str, Any] = {"runs": []}
    train_rows = IVFCoarse.TRAIN_ROWS
    IVFCoarse.TRAIN_ROWS = 500  # the inverted file at every size measured
    try:
        for n in (1_000, 2_000, 5_000, 10_000, 20_000):
            col, _ = build(workdir / f"small-{n}", CollectionConfig(dim=base.shape[1]), base[:n])
            lat = queries[:n_latency]
            exact = timed(lambda q, c=col: c.search(q, 10, exact=True, with_payload=False), lat)
            two_stage = timed(lambda q, c=col: c.search(q, 10, with_payload=False), lat)
            run = {"points": n, "exact_p50_ms": exact["p50_ms"], "two_stage_p50_ms": two_stage["p50_ms"]}
            out["runs"].append(run)
            print(f"small {run}", flush=True)
            col.close()
            shutil.rmtree(workdir / f"small-{n}")
    finally:
        IVFCoarse.TRAIN_ROWS = train_rows
    return out


def ingest(workdir: Path, seconds: float = 20.0) -> dict[str, Any]:
    """Search latency (one thread, back to back) idle, then while 200k npm vectors are upserted
    in batches of 1,000 from another thread into a collection of the 116,659 glosses."""
    base, queries = corpus("glosses")
    extra = npm_embeddings()[:200_000]
    col, _ = build(workdir / "ingest", CollectionConfig(dim=base.shape[1]), base)

    def loop(stop: threading.Event, out: list[float]) -> None:
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            col.search(queries[i % len(queries)], 10, with_payload=False)
            out.append(time.perf_counter() - t0)
            i += 1

    idle: list[float] = []
    stop = threading.Event()
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    loop(stop, idle)
    during: list[float] = []
    stop = threading.Event()
    searcher = threading.Thread(target=loop, args=(stop, during))
    searcher.start()
    t0 = time.perf_counter()
    for start in range(0, len(extra), 1000):
        col.upsert(list(range(len(base) + start, len(base) + start + min(1000, len(extra) - start))),
                   extra[start : start + 1000])
    ingest_s = time.perf_counter() - t0
    col.rebuilds.wait()
    stop.set()
    searcher.join()

    def summary(times: list[float]) -> dict[str, float]:
        ms = np.array(times) * 1000
        return {"searches": len(ms), "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
                "max_ms": float(ms.max())}

    out = {"idle": summary(idle), "during": summary(during), "vectors": len(extra), "ingest_s": ingest_s,
           "rebuilds_swapped": col.rebuilds.completed, "rows_after": col.count()}
    out["p99_ratio"] = out["during"]["p99_ms"] / out["idle"]["p99_ms"]
    print(f"ingest {out}", flush=True)
    col.close()
    shutil.rmtree(workdir / "ingest")
    return out


# -- output ---------------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [s for s in ("glosses", "npm", "1m") if s in result]
    panels = len(scales) + (1 if "growth" in result else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(6 * max(panels, 1), 5), squeeze=False)
    for ax, scale in zip(axes[0], scales, strict=False):
        part = result[scale]
        for nprobe in NPROBES:
            runs = [r for r in part["tandem"]["runs"] if r["nprobe"] == nprobe]
            if runs:
                ax.plot([r["p50_ms"] for r in runs], [r["recall_at_10"] for r in runs], "o-",
                        label=f"tandem nprobe {nprobe} (os {OVERSAMPLING[0]}-{OVERSAMPLING[-1]})")
        for peer in ("faiss-hnsw", "hnswlib"):
            if peer in part:
                runs = part[peer]["runs"]
                ax.plot([r["p50_ms"] for r in runs], [r["recall_at_10"] for r in runs], "s--", label=f"{peer} M=32")
        ax.axhline(0.99, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(0.9, 1.0)
        ax.set_xlabel("single-query p50 (ms, 1 thread, warm)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{scale}: {part['points']:,} MiniLM vectors")
        ax.legend(fontsize=7)
    if "growth" in result:
        ax = axes[0][-1]
        runs = result["growth"]["runs"]
        ax.plot([r["points"] for r in runs], [r["p50_ms"] for r in runs], "o-", label="tandem default")
        ax.set_xscale("log")
        ax.set_xlabel("points")
        ax.set_ylabel("p50 ms")
        ax.set_title("growth (default settings)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="*", default=["glosses", "npm", "1m"], choices=["glosses", "npm", "1m"])
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 4], help="extra bit widths (glosses)")
    parser.add_argument("--growth", action="store_true")
    parser.add_argument("--ingest", action="store_true")
    parser.add_argument("--small", action="store_true", help="exact scan against two stages at 1k-20k points")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--only-bits", action="store_true", help="only the extra bit widths (glosses)")
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=None, help="where collections are built (a real disk)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tandem-bench-", dir=os.environ.get("TMPDIR")))
    path = RESULTS / "index.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result = {k: v for k, v in result.items() if k in ("glosses", "npm", "1m", "growth", "ingest", "small")}
    result["machine"] = machine()
    result["faiss_threads_per_search"] = 1
    for name in args.corpus:
        base, queries = corpus(name)
        truth = exact_top(base, queries, 10)
        part: dict[str, Any] = {"points": len(base), "queries": len(queries), "date": time.strftime("%Y-%m-%d")}
        if args.only_bits:  # re-measure the extra bit widths into the existing entry
            part = result[name]
        else:
            part["tandem"] = tandem(name, base, queries, truth, workdir, args.latency_queries)
        if name == "glosses":
            for bits in args.bits:
                part[f"tandem-{bits}bit"] = tandem(name, base, queries, truth, workdir, args.latency_queries,
                                                   bits=bits)
        if args.peers and not args.only_bits:
            part["faiss-hnsw"] = faiss_hnsw(name, base, queries, truth, args.latency_queries)
            part["hnswlib"] = hnswlib_peer(name, base, queries, truth, args.latency_queries)
        result[name] = part
        write_result("index", result)
    if args.growth:
        result["growth"] = growth(workdir, args.latency_queries)
        write_result("index", result)
    if args.small:
        result["small"] = small(workdir, args.latency_queries)
        write_result("index", result)
    if args.ingest:
        result["ingest"] = ingest(workdir)
        write_result("index", result)
    plot(result, RESULTS / "index.png")
    print(f"wrote {path} and {RESULTS / 'index.png'}")


if __name__ == "__main__":
    main()
