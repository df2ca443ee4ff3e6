"""Candidate kernels for the coarse stage, measured side by side on real vectors (issue 16).

Each kind picks ``k * oversampling`` candidates that are then reranked exactly (here from a
float32 matrix in RAM, so that only the coarse stage differs). For each: recall@10 after the
rerank, single-query p50 on one thread, RAM per vector. faiss HNSW (M=32, efConstruction=200)
runs on the same vectors and queries as the peer.

    python -m benchmarks.coarse_bench [--corpus glosses|npm|1m] [--queries 1000]
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import faiss
import numpy as np

from benchmarks.corpora import gloss_embeddings, machine, npm_embeddings, write_result
from benchmarks.index_bench import exact_top, noisy_copies, split
from index.coarse import IVFCoarse


def p50_ms(fn: Any, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None, :])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def rerank(base: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int = 10) -> np.ndarray:
    cand = cand[cand >= 0]
    scores = base[cand] @ q[0]
    top = np.argpartition(-scores, min(k, len(cand) - 1))[:k]
    return cand[top[np.argsort(-scores[top])]]


def recall(truth: np.ndarray, found: list[np.ndarray], k: int = 10) -> float:
    pairs = zip(truth, found, strict=True)
    return float(np.mean([len(set(t[:k].tolist()) & set(f[:k].tolist())) / k for t, f in pairs]))


_ALIVE: list[Any] = []


def ivf_rabitq(base: np.ndarray, nlist: int, bits: int, fastscan: bool, hnsw_quantizer: bool) -> Any:
    d = base.shape[1]
    quantizer = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if hnsw_quantizer else faiss.IndexFlatIP(d)
    if hnsw_quantizer:
        quantizer.hnsw.efSearch = 64
    if fastscan:
        index = faiss.IndexIVFRaBitQFastScan(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT, 32, True, bits)
    else:
        index = faiss.IndexIVFRaBitQ(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT, True, bits)
    index.own_fields = False
    faiss.omp_set_num_threads(2)
    sample = base[np.random.default_rng(0).choice(len(base), min(len(base), nlist * 64), replace=False)]
    index.train(sample)
    index.add(base)
    _ALIVE.append(quantizer)  # faiss does not own it (own_fields False): keep it alive
    return index


def ivf_bytes(index: Any) -> int:
    invlists = faiss.extract_index_ivf(index).invlists
    total = 0
    for i in range(invlists.nlist):
        size = invlists.list_size(i)
        if hasattr(index, "bbs"):
            size = (size + index.bbs - 1) // index.bbs * index.bbs
        total += size * index.code_size + invlists.list_size(i) * 8
    return total + index.nlist * index.d * 4


def run(name: str, base: np.ndarray, queries: np.ndarray, n_latency: int, args: Any) -> dict[str, Any]:
    truth = exact_top(base, queries, 10)
    lat = queries[:n_latency]
    out: dict[str, Any] = {"points": len(base), "queries": len(queries), "kinds": {}}
    faiss.omp_set_num_threads(1)

    if args.hnsw:
        out["kinds"]["faiss-hnsw"] = run_hnsw(name, base, queries, truth, lat)
    for factor in args.nlist_factors:
        nlist = int(factor * math.sqrt(len(base)))
        for kind in args.kinds:
            bits = int(kind[-2])
            label = f"{kind}-nlist{nlist}"
            t0 = time.perf_counter()
            if kind.startswith("tandem-ivf"):  # the ivf stage itself, IVF + PQ 4-bit FastScan
                IVFCoarse.LISTS_PER_SQRT = factor
                stage = IVFCoarse(base.shape[1], bits=bits).rebuilt(lambda: iter([(0, base)]), len(base))
                index = stage.index
                nlist = stage.nlist
                ram = stage.ram_bytes() / len(base)
            else:
                index = ivf_rabitq(base, nlist, bits, "-fs" in kind, hnsw_quantizer=nlist >= 2048)
                ram = ivf_bytes(index) / len(base)
            build = time.perf_counter() - t0
            faiss.omp_set_num_threads(1)
            runs = []
            for nprobe in args.nprobes:
                for n in args.candidates:
                    if kind.startswith("tandem-ivf"):
                        params = faiss.SearchParametersIVF(nprobe=nprobe)
                    else:
                        params = faiss.IVFRaBitQSearchParameters()
                        params.nprobe = nprobe
                        params.qb = 8

                    def one(q: np.ndarray, n: int = n, params: Any = params, index: Any = index) -> np.ndarray:
                        _, cand = index.search(q, n, params=params)
                        return rerank(base, q, cand[0])

                    def coarse_only(q: np.ndarray, n: int = n, params: Any = params, index: Any = index) -> Any:
                        return index.search(q, n, params=params)

                    found = [one(q[None, :]) for q in queries]
                    r = recall(truth, found)
                    p = p50_ms(one, lat)
                    pc = p50_ms(coarse_only, lat)
                    runs.append({"nprobe": nprobe, "candidates": n, "recall_at_10": r, "p50_ms": p, "coarse_p50_ms": pc,
                                 "codes_scanned": nprobe * len(base) / nlist})
                    print(f"{name} {label} nprobe={nprobe} cand={n} recall={r:.4f} p50={p:.3f}ms coarse={pc:.3f}ms",
                          flush=True)
            out["kinds"][label] = {"nlist": nlist, "build_s": build, "ram_bytes_per_vector": ram, "runs": runs}
            print(f"{name} {label} build={build:.1f}s ram={ram:.1f} B/vec", flush=True)
    return out


def run_hnsw(name: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, lat: np.ndarray) -> dict[str, Any]:
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    faiss.omp_set_num_threads(2)
    hnsw.add(base)
    build = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    runs = []
    for ef in (16, 32, 64, 128):
        hnsw.hnsw.efSearch = ef
        _, found = hnsw.search(queries, 10)
        r = recall(truth, list(found))
        p = p50_ms(lambda q: hnsw.search(q, 10), lat)
        runs.append({"efSearch": ef, "recall_at_10": r, "p50_ms": p})
        print(f"{name} hnsw ef={ef} recall={r:.4f} p50={p:.3f}ms", flush=True)
    return {"build_s": build, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="glosses", choices=["glosses", "npm", "1m"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false")
    parser.add_argument("--nlist-factors", type=float, nargs="+", default=[1, 2, 4], help="nlist = factor * sqrt(N)")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--kinds", nargs="+", default=["tandem-ivf-1b", "ivf-rabitq-fs-1b", "ivf-rabitq-1b"])
    parser.add_argument("--out", default=None, help="result name (default coarse-<corpus>)")
    args = parser.parse_args()
    if args.corpus == "npm":
        base, queries = split(npm_embeddings(), args.queries)
    else:
        base, queries = split(gloss_embeddings(), args.queries)
        if args.corpus == "1m":
            base = noisy_copies(base, 1_000_000)
    result = {"machine": machine(), args.corpus: run(args.corpus, base, queries, args.latency_queries, args)}
    write_result(args.out or f"coarse-{args.corpus}", result)


if __name__ == "__main__":
    main()
