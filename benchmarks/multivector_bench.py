"""Multi-vector retrieval on SciFact: which vectors stand for a text, and what MUVERA FDEs cost.

1. Each document becomes a vector set, from the MiniLM encoder, in one of these ways:
   - ``token``: one vector per token (``TextEncoder.encode_tokens``: [CLS] and [SEP] kept, rows
     L2-normalised, truncated at 256 tokens like the sentence embedding); queries as tokens;
   - ``passage``: whole sentences grouped into passages of at most --passage-tokens tokens, the
     title in front of each, each passage embedded with ``encode``; the query is one vector;
   - ``passage-qtok``: the same passages, the query as its tokens;
   - ``passage+doc``: the passages plus the document's own sentence embedding; one query vector.
   For each, nDCG@10 of exact brute-force Chamfer (MaxSim), beside single-vector exact cosine.
2. For the --fde representations: MUVERA FDE (``index.fde``, default parameters) and an exact
   Chamfer rerank of the best 100 / 300 / 1000 candidates, against brute-force Chamfer over the
   whole corpus: recall@10 and nDCG@10 over all queries, single-query latency p50/p99 (query FDE
   + candidate selection + rerank) over --latency-queries. In numpy (exact FDE inner products
   over a float32 matrix in RAM, then ``index.fde.chamfer``), and through a multi-vector
   ``Collection`` with the binary and the PQ coarse stage (oversampling 10 / 30 / 100 at k=10),
   with RAM and disk bytes per document from ``stats()``.
3. A table on stdout; benchmarks/results/multivector.json and multivector.png.

Cached in benchmarks/cache/: the embeddings (float16; the single-vector ones are also taken from
``tandem eval``'s cache in models/.cache) and each representation's exact Chamfer score matrix.
Searches run with one BLAS thread (--threads). On the shared 2-core machine: ~25 min of encoding
on a cold cache, then ~13 min, most of it the collection's token-level searches.

    python -m benchmarks.multivector_bench [--fde token passage] [--passage-tokens 128]
        [--latency-queries 100] [--collection-queries 300] [--no-collection]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import CACHE, RESULTS, data_dir, machine, models_dir, write_result
from index.fde import DEFAULT_PARAMS, FDEEncoder, chamfer
from service.evaluate import BeirDataset, _find, _read_jsonl, embed_corpus, exact_search, load_beir, score_run

CANDIDATES = (100, 200, 300, 1000)
K = 10
CACHE_VERSION = "1"  # bump when the way a representation is built changes
# A sentence ends at . ! or ? followed by space and what can start a sentence. Scientific text
# has "et al. 2004" or "n = 17)." that this splits wrongly now and then; a passage boundary in
# the wrong place costs little, since passages group several sentences anyway.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


@dataclass(frozen=True)
class VectorSets:
    """``n`` vector sets back to back: set ``i`` is ``vectors[offsets[i]:offsets[i + 1]]``."""

    vectors: np.ndarray  # (t, dim) float32
    offsets: np.ndarray  # (n + 1,) int64

    @classmethod
    def of(cls, sets: Sequence[np.ndarray]) -> VectorSets:
        sizes = np.fromiter((len(s) for s in sets), np.int64, len(sets))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(np.concatenate(sets).astype(np.float32, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sets(self) -> list[np.ndarray]:
        """Views ``(m_i, dim)`` float32, one per set."""
        return [self.vectors[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


@dataclass(frozen=True)
class Representation:
    name: str
    description: str
    docs: VectorSets
    queries: list[np.ndarray]  # (m_q, dim) float32 per query
    key: str  # identifies the vectors, to key caches derived from them


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, (CACHE_VERSION, *parts))).encode()).hexdigest()[:16]


def cached_sets(path: Path, build: Callable[[], VectorSets]) -> VectorSets:
    """``build()``, saved to ``path`` as float16 vectors + offsets the first time."""
    if path.is_file():
        with np.load(path) as f:
            return VectorSets(f["vectors"].astype(np.float32), f["offsets"])
    t0 = time.perf_counter()
    sets = build()
    print(f"  built {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, vectors=sets.vectors.astype(np.float16), offsets=sets.offsets)
    tmp.replace(path)
    # Read back what was stored, so a first run measures the same float16-rounded vectors as a rerun.
    return VectorSets(sets.vectors.astype(np.float16).astype(np.float32), sets.offsets)


def encode_token_sets(encoder: Any, texts: Sequence[str], *, chunk: int = 512) -> VectorSets:
    """Token embeddings of ``texts``, encoded longest first across the corpus (little padding)."""
    from tqdm import tqdm

    order = np.argsort(encoder.count_tokens(texts), kind="stable")
    sets: list[np.ndarray] = [np.empty(0)] * len(texts)
    for start in tqdm(range(0, len(order), chunk), desc="token embeddings", file=sys.stderr):
        idx = order[start : start + chunk]
        for i, vectors in zip(idx, encoder.encode_tokens([texts[i] for i in idx]), strict=True):
            sets[i] = vectors
    return VectorSets.of(sets)


def split_passages(
    encoder: Any, titles: Sequence[str], bodies: Sequence[str], *, max_tokens: int
) -> tuple[list[str], np.ndarray]:
    """Passages of every document and ``(n + 1,)`` offsets (document ``i``'s passages are
    ``texts[offsets[i]:offsets[i + 1]]``).

    Whole sentences are grouped greedily while the title, a space and the group fit in
    ``max_tokens`` wordpieces; the title goes in front of every passage, since a sentence such as
    "These results suggest ..." says little without it. A sentence longer than the budget is a
    passage alone (the encoder truncates it at 256 tokens).
    """
    sentences = [[s for s in SENTENCE_END.split(b.strip()) if s] for b in bodies]
    flat = [s for doc in sentences for s in doc]
    flat_tokens = iter(n - 2 for n in encoder.count_tokens(flat))  # without [CLS] and [SEP]
    title_tokens = [n - 2 for n in encoder.count_tokens(list(titles))]
    texts: list[str] = []
    offsets = [0]
    for title, n_title, doc in zip(titles, title_tokens, sentences, strict=True):
        budget = max(max_tokens - n_title, max_tokens // 2)  # a very long title gets cut short
        group: list[str] = []
        used = 0
        for sentence in doc:
            n = next(flat_tokens)
            if group and used + n > budget:
                texts.append((title + " " + " ".join(group)).strip())
                group, used = [], 0
            group.append(sentence)
            used += n
        if group or not doc:
            texts.append((title + " " + " ".join(group)).strip())
        offsets.append(len(texts))
    return texts, np.array(offsets, dtype=np.int64)


class BruteForceChamfer:
    """Exact Chamfer of a query with every set, one BLAS product per block of ~64k vectors."""

    def __init__(self, docs: VectorSets, *, block_tokens: int = 65536) -> None:
        self.docs = docs
        self.blocks: list[tuple[int, int]] = []
        a = 0
        while a < len(docs):
            b = int(np.searchsorted(docs.offsets, docs.offsets[a] + block_tokens, side="right")) - 1
            b = min(max(b, a + 1), len(docs))
            self.blocks.append((a, b))
            a = b

    def scores(self, query: np.ndarray) -> np.ndarray:
        """``(n,)`` float32 Chamfer scores of ``query (m, dim)``."""
        out = np.empty(len(self.docs), dtype=np.float32)
        off = self.docs.offsets
        for a, b in self.blocks:
            similarity = query @ self.docs.vectors[off[a] : off[b]].T  # (m, tokens of the block)
            out[a:b] = np.maximum.reduceat(similarity, off[a:b] - off[a], axis=1).sum(axis=0)
        return out


def top(scores: np.ndarray, k: int, *, ordered: bool = True) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first unless ``ordered`` is False."""
    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")] if ordered else part


def latency(ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms))}


def recall_at_10(truth: Sequence[np.ndarray], found: Sequence[Any]) -> float:
    """Mean overlap of the first 10 of each ``found`` row (indices) with the first 10 of ``truth``."""
    return float(np.mean([len(set(t[:K].tolist()) & set(list(f)[:K])) / K for t, f in zip(truth, found, strict=True)]))


def ndcg(ds: BeirDataset, runs: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """nDCG@10, recall@100 and MRR@10 of ranked document indices, one row per query."""
    scores = score_run([[ds.doc_ids[i] for i in run] for run in runs], ds.query_ids, ds.qrels)
    return dict(zip(("ndcg_at_10", "recall_at_100", "mrr_at_10"), scores, strict=True))


# -- building the representations ---------------------------------------------------------------
def build_representations(
    ds: BeirDataset, encoder: Any, *, passage_tokens: int
) -> tuple[np.ndarray, np.ndarray, list[Representation]]:
    """Single-vector doc and query embeddings, and the multi-vector representations."""
    fp = encoder.fingerprint
    folder = data_dir() / "scifact"
    eval_key = hashlib.sha256(f"{folder.resolve()}|{len(ds.doc_ids)}|{fp}".encode()).hexdigest()[:16]
    name = f"corpus-{ds.name}-{encoder.name}-{eval_key}.npy"  # the name `tandem eval` caches under
    shared = models_dir() / ".cache" / name
    cache_file = shared if shared.is_file() and not (CACHE / name).is_file() else CACHE / name
    doc_vectors = embed_corpus(encoder, ds.doc_texts, cache_file=cache_file)
    query_vectors = encoder.encode(ds.query_texts)

    keys = {"docs": eval_key, "tokens": _key(fp, folder, len(ds.doc_ids)),
            "query-tokens": _key(fp, folder, ds.query_texts),
            "passages": _key(fp, folder, len(ds.doc_ids), passage_tokens)}
    tokens = cached_sets(CACHE / f"mv-{ds.name}-tokens-{keys['tokens']}.npz",
                         lambda: encode_token_sets(encoder, ds.doc_texts))
    query_tokens = cached_sets(CACHE / f"mv-{ds.name}-query-tokens-{keys['query-tokens']}.npz",
                               lambda: VectorSets.of(encoder.encode_tokens(ds.query_texts)))

    titles = {str(r["_id"]): r.get("title", "") for r in _read_jsonl(_find(folder, "corpus"))}
    doc_titles = [titles[d] for d in ds.doc_ids]
    bodies = [text[len(t):] if text.startswith(t) else text for t, text in zip(doc_titles, ds.doc_texts, strict=True)]
    texts, doc_offsets = split_passages(encoder, doc_titles, bodies, max_tokens=passage_tokens)

    def embed_passages() -> VectorSets:
        vectors = embed_corpus(encoder, texts, batch_size=64)
        return VectorSets(vectors, doc_offsets)

    passages = cached_sets(CACHE / f"mv-{ds.name}-passages{passage_tokens}-{keys['passages']}.npz", embed_passages)
    if not np.array_equal(passages.offsets, doc_offsets):
        raise RuntimeError("cached passages do not match the passage split: delete benchmarks/cache/mv-*")
    with_doc = VectorSets.of([np.vstack([doc_vectors[i : i + 1], s]) for i, s in enumerate(passages.sets())])
    one = [q[None, :] for q in query_vectors]
    reps = [
        Representation("token", "tokens (encode_tokens) for docs and queries", tokens, query_tokens.sets(),
                       key=f"{keys['tokens']}-{keys['query-tokens']}"),
        Representation("passage", f"passages <= {passage_tokens} tokens (title + sentences); query = 1 vector",
                       passages, one, key=f"{keys['passages']}-{keys['docs']}"),
        Representation("passage-qtok", f"passages <= {passage_tokens} tokens; query = its tokens",
                       passages, query_tokens.sets(), key=f"{keys['passages']}-{keys['query-tokens']}"),
        Representation("passage+doc", "passages plus the document's sentence vector; query = 1 vector",
                       with_doc, one, key=f"{keys['passages']}-{keys['docs']}"),
    ]
    return doc_vectors, query_vectors, reps


# -- measurements -------------------------------------------------------------------------------
def chamfer_scores(rep: Representation, brute: BruteForceChamfer, dataset: str) -> np.ndarray:
    """``(queries, docs)`` float32 exact Chamfer scores, cached: recall and nDCG for every query
    come from it, so a rerun only has to time the searches."""
    path = CACHE / f"mv-{dataset}-chamfer-{rep.name}-{_key(rep.key)}.npy"
    if path.is_file():
        cached: np.ndarray = np.load(path)
        return cached
    scores = np.stack([brute.scores(q) for q in rep.queries])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, scores)
    return scores


def measure_representation(rep: Representation, ds: BeirDataset, *, fde: bool, latency_queries: int) -> dict[str, Any]:
    """nDCG@10 of brute-force Chamfer; with ``fde``, recall@10 and nDCG@10 of FDE + exact rerank
    at each candidate count for every query, and single-query latencies of both paths on the
    first ``latency_queries`` queries (each FDE search timed right after the brute force of the
    same query, so that both see the same load on a shared machine)."""
    docs = rep.docs
    brute = BruteForceChamfer(docs)
    doc_sets = docs.sets()
    if not np.allclose(brute.scores(rep.queries[0])[:50], chamfer(rep.queries[0], doc_sets[:50]), rtol=1e-4, atol=1e-4):
        raise RuntimeError("brute-force Chamfer disagrees with index.fde.chamfer")
    exact = chamfer_scores(rep, brute, ds.name)
    brute_runs = [top(row, 100) for row in exact]
    truth = [r[:K] for r in brute_runs]
    result: dict[str, Any] = {
        "description": rep.description,
        "docs": len(docs),
        "vectors": int(len(docs.vectors)),
        "vectors_per_doc": {"mean": float(docs.sizes.mean()), "p50": float(np.median(docs.sizes)),
                            "max": int(docs.sizes.max())},
        "query_vectors_mean": float(np.mean([len(q) for q in rep.queries])),
        "_truth": truth,
    }
    encoder = FDEEncoder(docs.vectors.shape[1], params=DEFAULT_PARAMS)
    found: dict[int, list[np.ndarray]] = {n: [] for n in CANDIDATES}
    doc_fde = None
    if fde:
        t0 = time.perf_counter()
        doc_fde = encoder.encode_documents(doc_sets)
        result["fde_encode_docs_s"] = time.perf_counter() - t0
        fde_scores = encoder.encode_queries(rep.queries) @ doc_fde.T  # (queries, docs)
        for n in CANDIDATES:
            for row, fde_row in zip(exact, fde_scores, strict=True):
                candidates = top(fde_row, n, ordered=False)
                found[n].append(candidates[top(row[candidates], K)])
    brute_ms: list[float] = []
    fde_ms: dict[int, list[list[float]]] = {n: [] for n in CANDIDATES}
    same: dict[int, list[float]] = {n: [] for n in CANDIDATES}
    for i, q in enumerate(rep.queries[:latency_queries]):
        t0 = time.perf_counter()
        top(brute.scores(q), 100)
        brute_ms.append((time.perf_counter() - t0) * 1000)
        if doc_fde is None:
            continue
        for n in CANDIDATES:
            t0 = time.perf_counter()
            query_fde = encoder.encode_query(q)
            t1 = time.perf_counter()
            candidates = top(doc_fde @ query_fde, n, ordered=False)
            t2 = time.perf_counter()
            hits = candidates[top(chamfer(q, [doc_sets[j] for j in candidates]), K)]
            t3 = time.perf_counter()
            fde_ms[n].append([(t3 - t0) * 1000, (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000])
            same[n].append(len(set(hits.tolist()) & set(found[n][i].tolist())) / K)
    result["brute_force"] = {**ndcg(ds, brute_runs), **latency(brute_ms), "latency_queries": len(brute_ms)}
    if doc_fde is not None:
        rows = []
        for n in CANDIDATES:
            parts = np.array(fde_ms[n])
            lat = latency(parts[:, 0])
            rows.append({
                "candidates": n,
                "recall_at_10": recall_at_10(truth, found[n]),
                "ndcg_at_10": ndcg(ds, found[n])["ndcg_at_10"],
                **lat,
                "speedup_p50": result["brute_force"]["p50_ms"] / lat["p50_ms"],
                "mean_ms_query_fde": float(parts[:, 1].mean()),
                "mean_ms_select": float(parts[:, 2].mean()),
                "mean_ms_rerank": float(parts[:, 3].mean()),
                # the timed path (index.fde.chamfer) against the cached scores: 1.0 unless near-ties
                "timed_path_agreement": float(np.mean(same[n])),
            })
        result["fde_numpy"] = {"ram_bytes_per_doc": int(doc_fde.shape[1] * 4), "runs": rows}
    return result


def collection_error() -> str | None:
    """None when the library's multi-vector collections work on a tiny example, else why not."""
    try:
        from index import Collection, CollectionConfig, MultiVectorConfig

        rng = np.random.default_rng(0)
        sets = [rng.standard_normal((m, 8)).astype(np.float32) for m in (3, 5, 1)]
        with tempfile.TemporaryDirectory(prefix="tandem-mv-probe-") as tmp:
            cfg = CollectionConfig(dim=8, coarse="flat", multivector=MultiVectorConfig(d_proj=4, r_reps=2, k_sim=2))
            col = Collection.create(Path(tmp) / "c", cfg)
            try:
                col.upsert([0, 1, 2], sets)
                col.search([sets[1]], 2)
            finally:
                col.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "not there yet"
        return f"{type(exc).__name__}: {exc}"
    return None


def measure_collection(rep: Representation, ds: BeirDataset, truth: list[np.ndarray], brute_p50: float,
                       *, coarse: str, queries: int, exact_queries: int, workdir: Path) -> dict[str, Any]:
    """Build a multi-vector collection of ``rep``'s documents; recall@10, nDCG@10 and single-query
    latency of FDE + rerank at each candidate count (oversampling = candidates / k) over the first
    ``queries`` queries, one search at a time; then ``exact`` searches against numpy's."""
    from index import Collection, CollectionConfig, MultiVectorConfig
    from index.coarse import PQCoarse

    config = CollectionConfig(dim=rep.docs.vectors.shape[1], coarse=coarse, dtype="float16",
                              multivector=MultiVectorConfig())
    # PQ trains once a collection holds PQCoarse.TRAIN_ROWS (10,000) points; until then every
    # search is a brute-force scan. SciFact has 5,183 documents, so the benchmark lowers the bar
    # to the corpus size (reaching into the library) to measure PQ at all.
    train_rows = PQCoarse.TRAIN_ROWS
    PQCoarse.TRAIN_ROWS = min(train_rows, len(rep.docs))
    t0 = time.perf_counter()
    col = Collection.create(workdir / f"{rep.name}-{coarse}", config)
    try:
        doc_sets = rep.docs.sets()
        for start in range(0, len(doc_sets), 256):
            stop = min(start + 256, len(doc_sets))
            col.upsert(list(range(start, stop)), doc_sets[start:stop])
        stats = col.stats()
        out: dict[str, Any] = {
            "config": config.model_dump(exclude_none=True),
            "pq_train_rows": PQCoarse.TRAIN_ROWS if coarse == "pq" else None,
            "build_s": time.perf_counter() - t0,
            "points": stats.points,
            "ram_bytes_per_doc": stats.ram_bytes / stats.points,
            "disk_bytes_per_doc": stats.disk_bytes / stats.points,
            "runs": [],
        }
        # exact=True first: the collection's own brute force, a second baseline for the speedups.
        if exact_queries:
            ms, agree = [], []
            for i, q in enumerate(rep.queries[:exact_queries]):
                t1 = time.perf_counter()
                hits = col.search([q], K, exact=True, with_payload=False)[0]
                ms.append((time.perf_counter() - t1) * 1000)
                agree.append(len({int(h.id) for h in hits} & set(truth[i].tolist())) / K)
            out["exact"] = {"queries": len(ms), "agreement_at_10_with_numpy": float(np.mean(agree)), **latency(ms)}
        subset = rep.queries[:queries]
        for n in CANDIDATES:
            over = n / K
            if col.search_detailed(subset[:1], K, oversampling=over).candidates >= stats.points:
                out["exhaustive"] = "the coarse stage is not in use: every search scans the whole collection"
                break
            found, ms, coarse_ms, rerank_ms = [], [], [], []
            for q in subset:
                t1 = time.perf_counter()
                res = col.search_detailed([q], K, oversampling=over, with_payload=False)
                ms.append((time.perf_counter() - t1) * 1000)
                coarse_ms.append(res.coarse_s * 1000)
                rerank_ms.append(res.rerank_s * 1000)
                found.append([int(h.id) for h in res.hits[0]])
            lat = latency(ms)
            out["runs"].append({
                "candidates": n, "oversampling": over, "candidates_reported": res.candidates,
                "queries": len(subset),
                "recall_at_10": recall_at_10(truth[: len(subset)], found),
                "ndcg_at_10": ndcg(ds, found)["ndcg_at_10"] if len(subset) == len(rep.queries) else None,
                **lat, "speedup_p50": brute_p50 / lat["p50_ms"],
                "speedup_vs_exact_p50": out["exact"]["p50_ms"] / lat["p50_ms"] if "exact" in out else None,
                "mean_ms_coarse": float(np.mean(coarse_ms)), "mean_ms_rerank": float(np.mean(rerank_ms)),
            })
        return out
    finally:
        col.close()
        shutil.rmtree(col.path, ignore_errors=True)  # ~1 GB for token sets
        PQCoarse.TRAIN_ROWS = train_rows


# -- report -------------------------------------------------------------------------------------
def vs_exact(run: dict[str, Any]) -> str:
    return f"{run['speedup_vs_exact_p50']:>7.1f}x" if run.get("speedup_vs_exact_p50") else f"{'-':>8}"


def print_table(result: dict[str, Any]) -> None:
    single = result["single_vector"]
    print(f"\n{'representation':<14} {'vec/doc':>8} {'q vec':>6} {'nDCG@10':>8} {'R@100':>7} "
          f"{'brute p50 ms':>13} {'p99':>8}")
    print(f"{'single-vector':<14} {1:>8} {1:>6} {single['ndcg_at_10']:>8.5f} {single['recall_at_100']:>7.4f} "
          f"{single['p50_ms']:>13.2f} {single['p99_ms']:>8.2f}")
    for name, r in result["representations"].items():
        b = r["brute_force"]
        print(f"{name:<14} {r['vectors_per_doc']['mean']:>8.1f} {r['query_vectors_mean']:>6.1f} "
              f"{b['ndcg_at_10']:>8.5f} {b['recall_at_100']:>7.4f} {b['p50_ms']:>13.2f} {b['p99_ms']:>8.2f}")
    print(f"\n{'representation':<14} {'method':<7} {'cand.':>6} {'recall@10':>9} {'nDCG@10':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'speedup':>8} {'vs exact':>8} {'RAM B/doc':>10} {'disk B/doc':>11}")
    for name, r in result["representations"].items():
        methods = {"numpy": r.get("fde_numpy"), **r.get("collection", {})}
        for method, m in methods.items():
            if m and "error" in m:
                print(f"{name:<14} {method:<7} error: {m['error']}")
            if not m or "runs" not in m:
                continue
            disk = f"{m['disk_bytes_per_doc']:>11,.0f}" if "disk_bytes_per_doc" in m else f"{'':>11}"
            for run in m["runs"]:
                nd = f"{run['ndcg_at_10']:>8.5f}" if run["ndcg_at_10"] is not None else f"{'-':>8}"
                print(f"{name:<14} {method:<7} {run['candidates']:>6} {run['recall_at_10']:>9.4f} "
                      f"{nd} {run['p50_ms']:>8.2f} {run['p99_ms']:>8.2f} "
                      f"{run['speedup_p50']:>7.1f}x "
                      f"{vs_exact(run)} "
                      f"{m['ram_bytes_per_doc']:>10,.0f} {disk}")
            if "exhaustive" in m:
                print(f"{name:<14} {method:<7} {m['exhaustive']}")
            if "exact" in m:
                e = m["exact"]
                print(f"{name:<14} {method:<7} {'exact':>6} {e['agreement_at_10_with_numpy']:>9.4f} {'':>8} "
                      f"{e['p50_ms']:>8.2f} {e['p99_ms']:>8.2f} {r['brute_force']['p50_ms'] / e['p50_ms']:>7.1f}x")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = result["representations"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5))
    names = ["single-vector", *reps]
    values = [result["single_vector"]["ndcg_at_10"], *(r["brute_force"]["ndcg_at_10"] for r in reps.values())]
    ax1.barh(names, values, color=["grey"] + ["C0"] * len(reps))
    for y, v in enumerate(values):
        ax1.text(v, y, f" {v:.4f}", va="center", fontsize=8)
    ax1.axvline(0.64508, color="k", lw=0.8, ls=":", label="MTEB single-vector 0.64508")
    ax1.set_xlim(0, max(values) * 1.2)
    ax1.set_xlabel("nDCG@10 (exact: cosine / brute-force Chamfer)")
    ax1.set_title("SciFact test, all-MiniLM-L6-v2")
    ax1.legend(fontsize=8, loc="lower right")
    for i, (name, r) in enumerate(reps.items()):
        methods = {"numpy": r.get("fde_numpy"), **r.get("collection", {})}
        for style, (method, m) in zip(("o-", "s--", "^:"), methods.items(), strict=False):
            if not m or "runs" not in m:
                continue
            xs = [run["candidates"] for run in m["runs"]]
            ax2.plot(xs, [run["recall_at_10"] for run in m["runs"]], style, color=f"C{i}", label=f"{name} {method}")
            ax3.plot(xs, [run["p50_ms"] for run in m["runs"]], style, color=f"C{i}", label=f"{name} {method}")
        if "fde_numpy" in r:
            ax3.axhline(r["brute_force"]["p50_ms"], color=f"C{i}", lw=1, alpha=0.6, label=f"{name} brute force")
    ax2.axhline(0.95, color="grey", lw=0.8, ls="--")
    for ax in (ax2, ax3):
        ax.set_xscale("log")
        ax.set_xlabel("candidates reranked exactly")
        ax.legend(fontsize=7)
    ax2.set_ylabel("recall@10 vs brute-force Chamfer")
    ax2.set_title("FDE (k_sim=5, d_proj=16, R=20) + Chamfer rerank")
    ax3.set_yscale("log")
    ax3.set_ylabel("single-query p50 ms (FDE + select + rerank)")
    ax3.set_title("latency; horizontal: brute-force Chamfer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fde", nargs="*", default=["token", "passage"],
                        help="representations measured with FDE + rerank (default: token passage)")
    parser.add_argument("--passage-tokens", type=int, default=128, help="passage budget in wordpieces (default 128)")
    parser.add_argument("--no-collection", action="store_true", help="skip the Collection measurements")
    parser.add_argument("--coarse", nargs="*", default=["binary", "pq"], help="collection coarse kinds")
    parser.add_argument("--latency-queries", type=int, default=100,
                        help="queries timed in numpy, brute force and FDE (recall and nDCG use all)")
    parser.add_argument("--collection-queries", type=int, default=300,
                        help="queries searched one at a time per collection setting (default: all 300)")
    parser.add_argument("--exact-queries", type=int, default=20,
                        help="collection exact=True searches, in the first coarse kind only (~0.4 s each for tokens)")
    parser.add_argument("--wait-collection", type=float, default=0,
                        help="minutes to wait (polling) for multi-vector collections to work")
    parser.add_argument("--workdir", type=Path, default=None, help="where collections are built (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads while searching (default 1, as index_bench; encoding is unaffected)")
    args = parser.parse_args()

    from service.encoder import TextEncoder

    started = time.perf_counter()
    ds = load_beir(data_dir() / "scifact")
    encoder = TextEncoder.load(models_dir() / "minilm")
    doc_vectors, query_vectors, reps = build_representations(ds, encoder, passage_tokens=args.passage_tokens)
    # One BLAS thread by default, like the single-query figures of index_bench and FACTS.md: on
    # a shared 2-core machine a second thread mostly waits for the first (faiss there: 8.4 ms for
    # one query with 1 thread, 117 ms with 2).
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # not a declared dependency; comes with scikit-learn (fastembed)
        print("threadpoolctl missing: BLAS keeps its default threads", file=sys.stderr)
        blas: list[dict[str, Any]] = []
    else:
        threadpool_limits(limits=args.threads)
        blas = [{k: i.get(k) for k in ("internal_api", "num_threads")} for i in threadpool_info()]
    result: dict[str, Any] = {
        "dataset": {"name": ds.name, "docs": len(ds.doc_ids), "queries": len(ds.query_ids)},
        "encoder": {"name": encoder.name, "max_length": encoder.max_length},
        "fde_params": {"k_sim": DEFAULT_PARAMS.k_sim, "d_proj": DEFAULT_PARAMS.d_proj,
                       "r_reps": DEFAULT_PARAMS.r_reps, "seed": DEFAULT_PARAMS.seed},
        "passage_tokens": args.passage_tokens,
        "machine": {**machine(), "loadavg_start": os.getloadavg(), "blas": blas},
        "notes": "vectors are float16-rounded (as stored on disk); latencies single-query, warm, in RAM for "
                 "numpy; speedup = brute-force p50 / method p50, brute force in numpy over float32 in RAM; "
                 "speedup_vs_exact = the collection's exact=True p50 (float16 from the page cache) / method p50",
    }
    ms = []
    for q in query_vectors:
        t0 = time.perf_counter()
        exact_search(q[None, :], doc_vectors, 100)
        ms.append((time.perf_counter() - t0) * 1000)
    runs = exact_search(query_vectors, doc_vectors, 100)
    result["single_vector"] = {**ndcg(ds, runs), **latency(ms)}
    print(f"single-vector nDCG@10 {result['single_vector']['ndcg_at_10']:.5f}", flush=True)

    result["representations"] = {}
    for rep in reps:
        t0 = time.perf_counter()
        r = measure_representation(rep, ds, fde=rep.name in args.fde, latency_queries=args.latency_queries)
        result["representations"][rep.name] = r
        print(f"{rep.name}: brute-force nDCG@10 {r['brute_force']['ndcg_at_10']:.5f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    if not args.no_collection:
        deadline = time.monotonic() + args.wait_collection * 60
        while (error := collection_error()) is not None and time.monotonic() < deadline:
            print(f"multi-vector collection not ready ({error}); polling", flush=True)
            time.sleep(120)
        result["collection_error"] = error
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tandem-mv-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        for rep in reps:
            r = result["representations"][rep.name]
            if error is not None or rep.name not in args.fde:
                continue
            r["collection"] = {}
            for j, coarse in enumerate(args.coarse):
                t0 = time.perf_counter()
                try:
                    r["collection"][coarse] = measure_collection(
                        rep, ds, r["_truth"], r["brute_force"]["p50_ms"], coarse=coarse,
                        queries=args.collection_queries, exact_queries=args.exact_queries if j == 0 else 0,
                        workdir=workdir)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other kinds
                    r["collection"][coarse] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{rep.name} collection {coarse}: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in result["representations"].values():
        r.pop("_truth")
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - started
    print_table(result)
    path = write_result("multivector", result)
    plot(result, RESULTS / "multivector.png")
    print(f"\nwrote {path} and {RESULTS / 'multivector.png'} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
