"""Filtered search, count and facet on real vectors with realistic payloads (issue 11).

Corpora: the 116,659 WordNet glosses (1,000 held out as queries) and the 1M set of index_bench
(glosses, npm summaries and noisy copies of both). Payloads:

- ``pos`` and ``lex``: the gloss's part of speech and WordNet lexicographer file, kept by its
  noisy copies (npm rows: ``pos`` "pkg", ``lex`` "npm"); they follow the vectors' meaning, so a
  filter on them is correlated with the query;
- ``year`` (integer, uniform 1990-2025), ``date`` (RFC 3339, uniform over 2015-2025), ``rank``
  (float, uniform in [0, 1)) and ``tags`` (0-3 of 20 strings): seeded, independent of the vectors.

Every key has a payload index. Filters at 0.1%, 1%, 10% and 50% selectivity, uncorrelated
(``rank`` ranges) and correlated (``lex``), plus combinations and nested clauses. For each: p50 and
p99 of single-query searches (one thread, k=10), recall@10 against exact filtered search
(numpy, the same vectors), exact count and facet times; an unfiltered search in the same run; a
few filters again with their keys unindexed (the catalog path). On the glosses, faiss HNSW (M=32,
efConstruction=200) with the same filter as an ``IDSelectorBitmap`` is the peer.

    python -m benchmarks.filter_bench [--corpus glosses 1m] [--queries 300]

Writes ``benchmarks/results/filter.json`` and ``filter.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, gloss_metadata, machine, npm_embeddings, write_result
from benchmarks.index_bench import noisy_copies, recall, split
from index import Collection, CollectionConfig

INDEXES = {"pos": "keyword", "lex": "keyword", "year": "integer", "date": "datetime", "rank": "float",
           "tags": "keyword"}
TAGS = [f"t{i}" for i in range(20)]


def dataset(name: str) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``(base, queries, payloads)``; queries are held out of the base."""
    vectors = gloss_embeddings()
    meta = gloss_metadata()
    order = np.random.default_rng(0).permutation(len(vectors))  # as index_bench.split
    base, queries = vectors[order[1000:]], vectors[order[:1000]]
    labels = [meta[i] for i in order[1000:]]
    if name == "1m":
        nb, nq = split(npm_embeddings(), 1000)
        real = np.concatenate([base, nb])
        labels = labels + [("pkg", "npm")] * len(nb)
        sources: list[np.ndarray] = []
        base = noisy_copies(real, 1_000_000, sources=sources)
        labels = labels + [labels[i] for i in np.concatenate(sources).tolist()]
        queries = np.concatenate([queries[:500], nq[:500]])
    rng = np.random.default_rng(7)
    n = len(base)
    years = rng.integers(1990, 2026, n)
    start = np.datetime64("2015-01-01T00:00:00", "s").astype(np.int64)
    seconds = rng.integers(0, 10 * 365 * 86400, n) + start
    ranks = rng.random(n)
    n_tags = rng.integers(0, 4, n)
    payloads = []
    for i in range(n):
        tags = [TAGS[t] for t in rng.choice(20, n_tags[i], replace=False)] if n_tags[i] else []
        payloads.append({
            "pos": labels[i][0], "lex": labels[i][1], "year": int(years[i]),
            "date": np.datetime_as_string(np.datetime64(int(seconds[i]), "s")) + "Z",
            "rank": float(ranks[i]), "tags": tags,
        })
    return base, queries, payloads


def filters(payloads: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Named filters: uncorrelated ranges, correlated keywords, combinations."""
    n = len(payloads)
    lexes: dict[str, int] = {}
    for p in payloads:
        lexes[p["lex"]] = lexes.get(p["lex"], 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for share in (0.001, 0.01, 0.1, 0.5):
        out[f"rank<{share}"] = {"must": [{"key": "rank", "range": {"lt": share}}]}
    for share in (0.001, 0.01, 0.1):
        lex = min(lexes, key=lambda name: abs(np.log(lexes[name] / n / share)))
        out[f"lex={lex}"] = {"must": [{"key": "lex", "match": lex}]}
    biggest, total = [], 0
    for name, count in sorted(lexes.items(), key=lambda item: -item[1]):
        biggest.append(name)
        total += count
        if total >= n / 2:
            break
    out["lex any (~50%)"] = {"must": [{"key": "lex", "any": biggest}]}
    out["pos=v & year 2000-2009"] = {"must": [{"key": "pos", "match": "v"},
                                              {"key": "year", "range": {"gte": 2000, "lt": 2010}}]}
    out["date 2024 & tags t3"] = {"must": [{"key": "date", "range": {"gte": "2024-01-01T00:00:00Z"}},
                                           {"key": "tags", "match": "t3"}]}
    out["nested should, must_not"] = {
        "must": [{"should": [
            {"key": "lex", "match": "noun.animal"}, {"key": "lex", "match": "noun.plant"},
            {"must": [{"key": "tags", "any": ["t1", "t2"]}, {"key": "rank", "range": {"lt": 0.05}}]},
        ]}],
        "must_not": [{"key": "year", "range": {"lt": 1995}}],
    }
    return out


def passing(flt: dict[str, Any], payloads: list[dict[str, Any]], col: Collection) -> np.ndarray:
    """Rows that pass, from the collection's own exact count path cross-checked by size."""
    from index.filters import Filter

    rows = col._filter_rows(Filter.parse(flt))[0]  # noqa: SLF001 - the bench needs the row set
    return np.frombuffer(rows.to_array(), dtype=np.uint32).astype(np.int64)


def exact_filtered(base: np.ndarray, rows: np.ndarray, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    sub = base[rows]
    out = []
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ sub.T
        kk = min(k, len(rows))
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        out.extend(rows[np.take_along_axis(part, order, axis=1)].tolist())
    return out


def timed(fn: Any, items: Any) -> tuple[dict[str, float], list[Any]]:
    times, results = [], []
    for item in items:
        t0 = time.perf_counter()
        results.append(fn(item))
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}, results


def run(name: str, workdir: Path, n_queries: int, peers: bool) -> dict[str, Any]:
    base, queries, payloads = dataset(name)
    queries = queries[:n_queries]
    print(f"{name}: {len(base)} points, {len(queries)} queries", flush=True)
    t0 = time.perf_counter()
    col = Collection.create(workdir / name, CollectionConfig(dim=base.shape[1]))
    for start in range(0, len(base), 50_000):
        end = min(start + 50_000, len(base))
        col.upsert(list(range(start, end)), base[start:end], payloads[start:end])
    col.rebuilds.wait()
    entry: dict[str, Any] = {"points": len(base), "queries": len(queries), "build_s": time.perf_counter() - t0,
                             "index_build_s": {}}
    for key, type in INDEXES.items():
        t1 = time.perf_counter()
        col.create_payload_index(key, type)  # type: ignore[arg-type]
        entry["index_build_s"][key] = time.perf_counter() - t1
    info = col.payload_indexes()
    entry["index_ram_bytes_per_point"] = {k: v["ram_bytes"] / len(base) for k, v in info.items()}
    entry["index_ram_bytes_per_point_total"] = sum(entry["index_ram_bytes_per_point"].values())
    col.close()
    t1 = time.perf_counter()
    col = Collection.open(workdir / name)
    entry["open_s"] = time.perf_counter() - t1
    print(f"  built in {entry['build_s']:.0f} s; indexes {entry['index_build_s']}; "
          f"{entry['index_ram_bytes_per_point_total']:.1f} B/point; reopened in {entry['open_s']:.1f} s", flush=True)

    def unfiltered() -> dict[str, float]:
        stats, _ = timed(lambda q: col.search(q, 10, with_payload=False), queries)
        return stats

    hnsw = None
    if peers:
        t1 = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 200
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        hnsw.add(base)
        faiss.omp_set_num_threads(1)
        entry["hnsw_build_s"] = time.perf_counter() - t1

    before = unfiltered()
    entry["filters"] = {}
    for label, flt in filters(payloads).items():
        rows = passing(flt, payloads, col)
        truth = exact_filtered(base, rows, queries)
        stats, found = timed(lambda q, flt=flt: col.search(q, 10, filter=flt, with_payload=False), queries)
        got = [[int(h.id) for h in hits[0]] for hits in found]
        count_stats, counts = timed(lambda _, flt=flt: col.count(filter=flt), range(20))
        facet_stats, _ = timed(lambda _, flt=flt: col.facet("lex", filter=flt), range(20))
        run_entry = {
            "filter": flt, "matching": len(rows), "selectivity": len(rows) / len(base),
            "recall_at_10": recall(np.array([t + [-1] * (10 - len(t)) for t in truth]), got),
            "short_answers": sum(len(g) < min(10, len(rows)) for g in got),
            **stats, "count_p50_ms": count_stats["p50_ms"], "count_ok": counts[0] == len(rows),
            "facet_p50_ms": facet_stats["p50_ms"],
        }
        if hnsw is not None:
            mask = np.zeros(len(base), dtype=bool)
            mask[rows] = True
            bits = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
            run_entry["hnsw"] = []
            for ef in (64, 128, 256):
                params = faiss.SearchParametersHNSW(efSearch=ef)
                params.sel = sel
                hstats, hfound = timed(lambda q, p=params: hnsw.search(q[None, :], 10, params=p)[1][0], queries)
                hgot = [[int(r) for r in f if r >= 0] for f in hfound]
                run_entry["hnsw"].append({"efSearch": ef, **hstats, "recall_at_10": recall(
                    np.array([t + [-1] * (10 - len(t)) for t in truth]), hgot)})
        entry["filters"][label] = run_entry
        print(f"  {label}: {len(rows)} rows ({run_entry['selectivity']:.4f}) recall={run_entry['recall_at_10']:.4f} "
              f"p50={stats['p50_ms']:.2f} p99={stats['p99_ms']:.2f} ms count={count_stats['p50_ms']:.2f} "
              f"facet={facet_stats['p50_ms']:.2f} ms"
              + (f" hnsw ef128 {run_entry['hnsw'][1]['recall_at_10']:.4f}@{run_entry['hnsw'][1]['p50_ms']:.2f}"
                 if hnsw is not None else ""), flush=True)
    after = unfiltered()
    entry["unfiltered"] = {"before": before, "after": after,
                           "p50_ms": float(np.median([before["p50_ms"], after["p50_ms"]]))}
    if hnsw is not None:
        hnsw_unf = {}
        for ef in (64, 128, 256):
            hnsw.hnsw.efSearch = ef
            hnsw_unf[str(ef)], _ = timed(lambda q: hnsw.search(q[None, :], 10), queries)
        entry["hnsw_unfiltered"] = hnsw_unf
    print(f"  unfiltered p50 {before['p50_ms']:.2f} / {after['p50_ms']:.2f} ms", flush=True)

    # The catalog path: the same filters with their keys unindexed.
    entry["unindexed"] = {}
    for label in ("rank<0.01", "rank<0.1"):
        flt = filters(payloads)[label] if label in filters(payloads) else None
        if flt is None:
            continue
        col.drop_payload_index("rank")
        stats, _ = timed(lambda q, flt=flt: col.search(q, 10, filter=flt, with_payload=False), queries[:10])
        entry["unindexed"][label] = stats
        col.create_payload_index("rank", "float")
        print(f"  unindexed {label}: p50 {stats['p50_ms']:.1f} ms", flush=True)
    col.close()
    return entry


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("glosses", "1m") if n in result]
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        entry = result[name]
        runs = entry["filters"]
        labels = list(runs)
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [runs[label]["p50_ms"] for label in labels], 0.4, label="tandem filtered p50")
        if "hnsw" in runs[labels[0]]:
            ax.bar(x + 0.2, [runs[label]["hnsw"][1]["p50_ms"] for label in labels], 0.4,
                   label="faiss HNSW + IDSelector, ef=128, p50")
        ax.axhline(entry["unfiltered"]["p50_ms"], color="k", ls="--", label="tandem unfiltered p50")
        ax.axhline(2 * entry["unfiltered"]["p50_ms"], color="r", ls=":", label="2x unfiltered (target)")
        for i, label in enumerate(labels):
            ax.text(i - 0.2, runs[label]["p50_ms"], f"{runs[label]['recall_at_10']:.3f}", rotation=90,
                    va="bottom", ha="center", fontsize=7)
            if "hnsw" in runs[label]:
                ax.text(i + 0.2, runs[label]["hnsw"][1]["p50_ms"], f"{runs[label]['hnsw'][1]['recall_at_10']:.3f}",
                        rotation=90, va="bottom", ha="center", fontsize=7, color="tab:orange")
        ax.set_xticks(x, [f"{label}\n{runs[label]['selectivity']:.2%}" for label in labels], rotation=60,
                      ha="right", fontsize=7)
        ax.set_ylabel("ms per query (numbers: recall@10 against exact filtered search)")
        ax.set_title(f"{name}: {entry['points']:,} points")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="*", default=["glosses", "1m"], choices=["glosses", "1m"])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    out = RESULTS / "filter.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = machine()
    workdir = Path(tempfile.mkdtemp(prefix="tandem-filter-"))
    try:
        for name in args.corpus:
            result[name] = run(name, workdir, args.queries if name == "glosses" else min(args.queries, 200),
                               peers=not args.no_peers and name == "glosses")
            write_result("filter", result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plot(result, RESULTS / "filter.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
