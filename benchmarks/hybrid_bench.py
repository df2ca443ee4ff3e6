"""Dense, sparse (BM25) and hybrid retrieval quality on two corpora, and which fusion to default to.

    python -m benchmarks.hybrid_bench [--npm-queries 2000]

Tasks (both real text, judged):
1. BEIR SciFact (`../shared/data/scifact`): 5,183 abstracts, 300 judged claims, graded qrels.
2. npm known-item: the ~179k npm package summaries (benchmarks/corpora.npm_texts); a query is a
   package's name with its separators turned to spaces ("ray aabb intersection"), the one relevant
   document that package's summary. Names are what people type; summaries rarely repeat them whole.

Per query: the exact dense top 100 (MiniLM cosine, numpy), BM25's top 100 (tandem's sparse stage,
tantivy), and their union scored by the exact dense score, as tandem's hybrid mode does. Fusions
compared on the same candidates: reciprocal rank fusion (RRF) with k = 10, 30, 60, 100, and a convex
combination alpha * dense + (1 - alpha) * BM25 of min-max normalised scores for alpha 0.2-0.8.
Then tandem's own searches (the library, default settings: convex fusion; k = 100) for the figures it
serves. nDCG@10, recall@100, MRR@10. Writes benchmarks/results/hybrid.json and hybrid.png.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, ROOT, data_dir, machine, models_dir, npm_embeddings, npm_texts, write_result

N = 100  # candidates per side, and the depth recall is measured at
RRF_KS = (10, 30, 60, 100)
ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def npm_task(n_queries: int, seed: int = 0) -> tuple[list[str], list[str], list[str], dict[str, dict[str, int]]]:
    """(doc ids, doc texts, query texts, qrels) of the npm known-item task."""
    texts = npm_texts()
    index = {t: i for i, t in enumerate(texts)}
    path = Path(os.environ.get("TANDEM_NPM_TSV", ROOT.parent / ".library" / "env" / "packages" / "npm.tsv"))
    pairs: list[tuple[str, int]] = []
    seen: set[int] = set()
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4:
                continue
            summary = re.sub(r"^\[tested here:[^\]]*\]\s*", "", fields[3]).strip()
            doc = index.get(summary)
            words = re.sub(r"[@/._\-]+", " ", fields[0]).strip()
            if doc is not None and doc not in seen and len(words) >= 3:
                seen.add(doc)  # the summary's first package: the one it belongs to
                pairs.append((words, doc))
    rng = np.random.default_rng(seed)
    picked = [pairs[i] for i in rng.choice(len(pairs), size=min(n_queries, len(pairs)), replace=False)]
    doc_ids = [str(i) for i in range(len(texts))]
    queries = [w for w, _ in picked]
    qrels = {str(q): {str(doc): 1} for q, (_, doc) in enumerate(picked)}
    return doc_ids, texts, queries, qrels


def scifact_task() -> tuple[list[str], list[str], list[str], list[str], dict[str, dict[str, int]]]:
    from service.evaluate import load_beir

    ds = load_beir(data_dir() / "scifact")
    return ds.doc_ids, ds.doc_texts, ds.query_ids, ds.query_texts, ds.qrels


def evaluate(name: str, doc_ids: list[str], docs: np.ndarray, texts: list[str], query_ids: list[str],
             queries: np.ndarray, query_texts: list[str], qrels: dict[str, dict[str, int]]) -> dict[str, Any]:
    from index import Collection, CollectionConfig
    from index.coarse.sparse import SparseStage
    from index.collection import convex, rrf
    from service.evaluate import score_run

    out: dict[str, Any] = {"docs": len(doc_ids), "queries": len(query_ids)}
    runs: dict[str, list[list[str]]] = {"dense": [], "sparse (BM25)": []}
    for k in RRF_KS:
        runs[f"rrf k={k}"] = []
    for a in ALPHAS:
        runs[f"convex a={a}"] = []
    with tempfile.TemporaryDirectory(prefix="tandem-hybrid-") as tmp:
        stage = SparseStage(Path(tmp) / "sparse")
        t0 = time.perf_counter()
        for start in range(0, len(texts), 8192):
            stage.write(start, texts[start : start + 8192])
        out["sparse_build_s"] = round(time.perf_counter() - t0, 2)
        out["sparse_disk_bytes_per_doc"] = round(stage.disk_bytes() / len(texts), 1)
        sparse_ms = []
        for qi, (q, text) in enumerate(zip(queries, query_texts, strict=True)):
            dense_scores = docs @ q
            dense_top = np.argsort(-dense_scores, kind="stable")[:N]
            t = time.perf_counter()
            lexical, bm25 = stage.candidates(text, N, allowed=None)
            sparse_ms.append((time.perf_counter() - t) * 1000)
            runs["dense"].append([doc_ids[i] for i in dense_top])
            runs["sparse (BM25)"].append([doc_ids[i] for i in lexical])
            union = np.union1d(dense_top, lexical)
            by_dense = union[np.argsort(-dense_scores[union], kind="stable")]
            for k in RRF_KS:  # the library's fusions, with each constant
                rows, _ = rrf(by_dense, lexical, N, k_rrf=k)
                runs[f"rrf k={k}"].append([doc_ids[r] for r in rows.tolist()])
            for a in ALPHAS:
                rows, _ = convex(by_dense, dense_scores[by_dense], lexical, bm25, N, weight=a)
                runs[f"convex a={a}"].append([doc_ids[r] for r in rows.tolist()])
            if qi % 500 == 499:
                print(f"  {name}: {qi + 1} queries", flush=True)
        out["sparse_p50_ms"] = round(float(np.median(sparse_ms)), 3)
        stage.close()
        # tandem's own hybrid search, as it serves it (default coarse stage and oversampling)
        col = Collection.create(Path(tmp) / "col", CollectionConfig(dim=docs.shape[1], sparse=True))
        for start in range(0, len(texts), 8192):
            col.upsert(list(range(start, min(start + 8192, len(texts)))), docs[start : start + 8192],
                       texts=texts[start : start + 8192])
        for mode in ("dense", "sparse", "hybrid"):
            run = []
            for q, text in zip(queries, query_texts, strict=True):
                hits = col.search(q if mode != "sparse" else None, N, text=text, mode=mode)[0]  # type: ignore[arg-type]
                run.append([doc_ids[int(h.id)] for h in hits])
            runs[f"tandem {mode}"] = run
        col.close()
    out["metrics"] = {}
    for method, run in runs.items():
        ndcg, recall, mrr = score_run(run, query_ids, qrels)
        out["metrics"][method] = {"ndcg@10": round(ndcg, 5), "recall@100": round(recall, 4), "mrr@10": round(mrr, 4)}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5))
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        m = result["tasks"][task]["metrics"]
        names = list(m)
        y = np.arange(len(names))
        ax.barh(y, [m[n]["ndcg@10"] for n in names],
                color=["tab:orange" if n.startswith("tandem") else "tab:blue" for n in names])
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        lo = min(m[n]["ndcg@10"] for n in names)
        ax.set_xlim(max(0, lo - 0.05), max(m[n]["ndcg@10"] for n in names) + 0.02)
        ax.set_title(f"{task}: nDCG@10", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--npm-queries", type=int, default=2000)
    args = parser.parse_args()
    from service.encoder import TextEncoder
    from service.evaluate import embed_corpus

    encoder = TextEncoder.load(models_dir() / "minilm")
    result: dict[str, Any] = {"machine": machine(), "candidates_per_side": N, "tasks": {}}
    doc_ids, texts, query_ids, query_texts, qrels = scifact_task()
    docs = embed_corpus(encoder, texts, batch_size=64, cache_file=models_dir() / ".cache" / "scifact-hybrid.npy",
                        progress=False)
    queries = encoder.encode(query_texts, batch_size=64)
    result["tasks"]["scifact"] = evaluate("scifact", doc_ids, docs, texts, query_ids, queries, query_texts, qrels)
    print(result["tasks"]["scifact"], flush=True)
    doc_ids, texts, query_texts, qrels = npm_task(args.npm_queries)
    queries = encoder.encode(query_texts, batch_size=64)
    result["tasks"]["npm names"] = evaluate("npm", doc_ids, npm_embeddings(), texts, list(qrels), queries,
                                            query_texts, qrels)
    print(result["tasks"]["npm names"], flush=True)
    result["args"] = vars(args)
    print("wrote", write_result("hybrid", result))
    plot(result, RESULTS / "hybrid.png")


if __name__ == "__main__":
    main()
