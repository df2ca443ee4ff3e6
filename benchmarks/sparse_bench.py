"""Latency, build time and memory of the search modes on one collection: dense, sparse, hybrid.

    python -m benchmarks.sparse_bench [--sizes glosses,1m] [--queries 300]

Collections with `sparse: true` beside the default dense stage (ivf), built in the library:
- glosses: the 116,659 WordNet glosses not held out, with their texts;
- 1m: those, the npm summaries not held out, and noisy copies of both up to 1,000,000 rows, each
  copy keeping its source's text (index_bench's 1M set, with text).
Queries: held-out glosses (and, at 1M, half npm summaries): the embedding as the vector, the
first 8 words of the text as the lexical query. Single queries, one thread, the three modes
interleaved query by query (same machine state for each); k = 10, default oversampling.
Writes benchmarks/results/sparse.json and sparse.png.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, gloss_texts, machine, npm_embeddings, npm_texts, write_result
from benchmarks.index_bench import noisy_copies

MODES = ("dense", "sparse", "hybrid")


def dataset(name: str, n_queries: int) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """``(base vectors, base texts, query vectors, query texts)``."""
    vectors, texts = gloss_embeddings(), gloss_texts()
    order = np.random.default_rng(0).permutation(len(vectors))  # as index_bench.split
    base, base_texts = vectors[order[1000:]], [texts[i] for i in order[1000:]]
    queries, query_texts = vectors[order[:n_queries]], [texts[i] for i in order[:n_queries]]
    if name == "1m":
        nv, nt = npm_embeddings(), npm_texts()
        norder = np.random.default_rng(0).permutation(len(nv))
        real = np.concatenate([base, nv[norder[1000:]]])
        real_texts = base_texts + [nt[i] for i in norder[1000:]]
        sources: list[np.ndarray] = []
        base = noisy_copies(real, 1_000_000, sources=sources)
        base_texts = real_texts + [real_texts[i] for i in np.concatenate(sources).tolist()]
        half = n_queries // 2
        queries = np.concatenate([queries[:half], nv[norder[:half]]])
        query_texts = query_texts[:half] + [nt[i] for i in norder[:half]]
    return base, base_texts, queries, [" ".join(t.split()[:8]) for t in query_texts]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(name: str, workdir: Path, n_queries: int) -> dict[str, Any]:
    from index import Collection, CollectionConfig

    base, texts, queries, query_texts = dataset(name, n_queries)
    out: dict[str, Any] = {"points": len(base), "queries": len(queries)}
    builds = {}
    variants = (("dense only", False), ("dense + sparse", True)) if name == "glosses" else (("dense + sparse", True),)
    for label, sparse in variants:  # (the build without the sparse stage, for its cost: glosses only)
        t0 = time.perf_counter()
        col = Collection.create(workdir / f"{name}-{sparse}", CollectionConfig(dim=base.shape[1], sparse=sparse))
        for start in range(0, len(base), 50_000):
            col.upsert(list(range(start, min(start + 50_000, len(base)))), base[start : start + 50_000],
                       texts=texts[start : start + 50_000])
        col.rebuilds.wait()
        builds[label] = round(time.perf_counter() - t0, 1)
        if sparse:
            break
        col.close()
    out["build_s"] = builds
    stage = col._sparse  # noqa: SLF001 - the benchmark reports the stage's own size
    assert stage is not None
    out["sparse_index_bytes"] = stage.disk_bytes()
    out["sparse_bytes_per_point"] = round(stage.disk_bytes() / len(base), 1)
    out["dense_stage_ram_bytes_per_point"] = round(col.stats().ram_bytes / len(base), 1)
    for q, t in zip(queries[:20], query_texts[:20], strict=True):  # warm-up: page cache, first calls
        for mode in MODES:
            col.search(q, 10, text=t, mode=mode)  # type: ignore[arg-type]
    rss_before = rss_mb()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    stages: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    overlap = []
    for q, t in zip(queries, query_texts, strict=True):
        found = {}
        for mode in MODES:
            t0 = time.perf_counter()
            r = col.search_detailed(q if mode != "sparse" else None, 10, text=t, mode=mode)  # type: ignore[arg-type]
            times[mode].append(time.perf_counter() - t0)
            stages[mode].append((r.coarse_s, r.sparse_s, r.rerank_s))
            found[mode] = {h.id for h in r.hits[0]}
        overlap.append(len(found["hybrid"] & found["dense"]) / 10)
    out["rss_mb_during_search"] = round(rss_mb(), 1)
    out["rss_mb_growth_during_search"] = round(rss_mb() - rss_before, 1)
    out["latency"] = {}
    for mode in MODES:
        ms = np.array(times[mode]) * 1000
        st = np.array(stages[mode]) * 1000
        out["latency"][mode] = {
            "p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "dense_coarse_p50_ms": round(float(np.median(st[:, 0])), 3),
            "sparse_p50_ms": round(float(np.median(st[:, 1])), 3),
            "rerank_fuse_p50_ms": round(float(np.median(st[:, 2])), 3),
        }
    out["hybrid_over_dense_p50"] = round(out["latency"]["hybrid"]["p50_ms"] / out["latency"]["dense"]["p50_ms"], 2)
    out["hybrid_top10_shared_with_dense"] = round(float(np.mean(overlap)), 3)
    col.close()
    return out


def libraries(n_queries: int) -> dict[str, Any]:
    """bm25s (with PyStemmer) against tantivy on the glosses: build time, a query's top 100 (rows
    included), memory, and what an append costs; the measurement the sparse stage was chosen by."""
    import bm25s
    import Stemmer
    import tantivy

    from index.coarse.sparse import SparseStage

    _, texts, _, queries = dataset("glosses", n_queries)
    out: dict[str, Any] = {"docs": len(texts)}
    stemmer = Stemmer.Stemmer("english")
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    build = time.perf_counter() - t0
    ms = []
    for q in queries:
        t = time.perf_counter()
        tokens = bm25s.tokenize([q], stopwords="en", stemmer=stemmer, show_progress=False, return_ids=False)
        retriever.retrieve(tokens, k=100, show_progress=False, n_threads=1)
        ms.append((time.perf_counter() - t) * 1000)
    matrix = retriever.scores
    out["bm25s"] = {"build_s": round(build, 2), "query_p50_ms": round(float(np.median(ms)), 3),
                    "ram_bytes_per_doc": round(sum(matrix[k].nbytes for k in ("data", "indices", "indptr"))
                                               / len(texts), 1),
                    "appends": "none: the score matrix is built whole (index() again)"}
    with tempfile.TemporaryDirectory(prefix="tandem-lib-") as tmp:
        stage = SparseStage(Path(tmp) / "s")
        t0 = time.perf_counter()
        stage.write(0, texts)
        build = time.perf_counter() - t0
        ms = []
        for q in queries:
            t = time.perf_counter()
            stage.candidates(q, 100, allowed=None)
            ms.append((time.perf_counter() - t) * 1000)
        appends = []
        for j in range(20):
            t = time.perf_counter()
            stage.write(len(texts) + 64 * j, texts[64 * j : 64 * (j + 1)])
            appends.append((time.perf_counter() - t) * 1000)
        out["tantivy"] = {"version": tantivy.__version__ if hasattr(tantivy, "__version__") else "?",
                          "build_s": round(build, 2), "query_p50_ms": round(float(np.median(ms)), 3),
                          "index_bytes_per_doc": round(stage.disk_bytes() / len(texts), 1),
                          "append_64_docs_and_commit_p50_ms": round(float(np.median(appends)), 2)}
        stage.close()
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sizes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(names))
    for i, mode in enumerate(MODES):
        ax.bar(x + (i - 1) * 0.25, [result["sizes"][n]["latency"][mode]["p50_ms"] for n in names], 0.25, label=mode)
    ax.set_xticks(x, [f"{n} ({result['sizes'][n]['points']:,} points)" for n in names])
    ax.set_ylabel("p50 ms, single query, 1 thread")
    ax.set_title(f"search modes, {result['machine']['cpus']} CPUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="glosses,1m")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine(), "loadavg_at_start": os.getloadavg(), "sizes": {}}
    result["libraries"] = libraries(args.queries)
    print("libraries", result["libraries"], flush=True)
    with tempfile.TemporaryDirectory(prefix="tandem-sparse-") as tmp:
        for name in args.sizes.split(","):
            result["sizes"][name] = run(name, Path(tmp), args.queries)
            print(name, result["sizes"][name], flush=True)
    result["loadavg_at_end"] = os.getloadavg()
    result["args"] = vars(args)
    print("wrote", write_result("sparse", result))
    plot(result, RESULTS / "sparse.png")


if __name__ == "__main__":
    main()
