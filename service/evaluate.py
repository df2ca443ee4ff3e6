"""Retrieval quality on a BEIR dataset: exact search, then the index's two-stage settings.

Scored the way MTEB scores retrieval, so our figure compares with the published one:
documents embedded as `(title + " " + text).strip()`, queries as their text, cosine
similarity, only queries with judgments scored, nDCG@10 trec_eval style (gain = graded
relevance, discount log2(rank + 1), ideal ranking from the qrels).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_OVERSAMPLING = (2.0, 4.0, 8.0)


class Encoder(Protocol):  # what run_eval needs from service.encoder.TextEncoder
    name: str
    dim: int

    @property
    def fingerprint(self) -> str: ...

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


@dataclass(frozen=True)
class BeirDataset:
    name: str
    doc_ids: list[str]
    doc_texts: list[str]  # (title + " " + text).strip()
    query_ids: list[str]  # only queries with at least one judgment
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> graded relevance


@dataclass(frozen=True)
class EvalRow:
    method: str
    ndcg_at_10: float
    recall_at_100: float
    mrr_at_10: float
    ms_per_query: float
    candidates: int | None = None


def load_beir(folder: Path, *, split: str = "test") -> BeirDataset:
    """Read corpus.jsonl(.gz), queries.jsonl(.gz) and qrels/<split>.tsv from a BEIR folder."""
    folder = Path(folder)
    qrels: dict[str, dict[str, int]] = {}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        raise FileNotFoundError(f"{qrels_path} not found: is {folder} a BEIR dataset folder?")
    with qrels_path.open(newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if header[:2] != ["query-id", "corpus-id"]:
            raise ValueError(
                f"{qrels_path}: expected a header 'query-id corpus-id score', got {header}"
            )
        for qid, did, score in reader:
            qrels.setdefault(qid, {})[did] = int(score)

    doc_ids: list[str] = []
    doc_texts: list[str] = []
    for rec in _read_jsonl(_find(folder, "corpus")):
        doc_ids.append(str(rec["_id"]))
        doc_texts.append((rec.get("title", "") + " " + rec.get("text", "")).strip())

    query_ids: list[str] = []
    query_texts: list[str] = []
    for rec in _read_jsonl(_find(folder, "queries")):
        qid = str(rec["_id"])
        if qid in qrels:
            query_ids.append(qid)
            query_texts.append(rec["text"])
    missing = set(qrels) - set(query_ids)
    if missing:
        logger.warning("%d judged queries have no text in queries.jsonl", len(missing))
    return BeirDataset(folder.name, doc_ids, doc_texts, query_ids, query_texts, qrels)


def score_run(
    run: Sequence[Sequence[str]], query_ids: Sequence[str], qrels: dict[str, dict[str, int]]
) -> tuple[float, float, float]:
    """Mean (nDCG@10, recall@100, MRR@10) of ranked doc-id lists, one per query id."""
    ndcg, recall, mrr = [], [], []
    for qid, ranked in zip(query_ids, run, strict=True):
        rels = qrels.get(qid, {})
        relevant = {d for d, r in rels.items() if r > 0}
        gains = [rels.get(d, 0) for d in ranked[:10]]
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains) if g > 0)
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:10]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        ndcg.append(dcg / idcg if idcg > 0 else 0.0)
        recall.append(len(relevant & set(ranked[:100])) / len(relevant) if relevant else 0.0)
        first = next((i for i, d in enumerate(ranked[:10]) if d in relevant), None)
        mrr.append(0.0 if first is None else 1.0 / (first + 1))
    return float(np.mean(ndcg)), float(np.mean(recall)), float(np.mean(mrr))


def embed_corpus(
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    cache_file: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(n, dim) float32 embeddings of `texts`, read from / written to `cache_file` if given."""
    if cache_file is not None and cache_file.is_file():
        vectors: np.ndarray = np.load(cache_file)
        if vectors.shape == (len(texts), encoder.dim):
            logger.info("corpus embeddings read from %s", cache_file)
            return vectors
    from tqdm import tqdm

    # Sort the whole corpus by token count once, so each encode() call pads little.
    order = np.argsort(encoder.count_tokens(texts), kind="stable")
    vectors = np.empty((len(texts), encoder.dim), dtype=np.float32)
    chunk = batch_size * 4
    with tqdm(total=len(texts), desc="embedding corpus", unit="doc", file=sys.stderr,
              disable=not progress) as bar:
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            vectors[idx] = encoder.encode([texts[i] for i in idx], batch_size=batch_size)
            bar.update(len(idx))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(cache_file)
    return vectors


def exact_search(queries: np.ndarray, docs: np.ndarray, k: int) -> np.ndarray:
    """Indices (nq, k) of the top-k docs by dot product, best first."""
    scores = queries @ docs.T
    k = min(k, docs.shape[0])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, axis=1)
    return np.take_along_axis(top, np.argsort(-part, axis=1, kind="stable"), axis=1)


def run_eval(
    folder: Path,
    encoder: Encoder,
    *,
    batch_size: int = 64,
    cache_dir: Path | None = None,
    two_stage: bool = True,
    oversampling: Iterable[float] = DEFAULT_OVERSAMPLING,
    progress: bool = True,
    out: Any = None,
) -> list[EvalRow]:
    """Embed a BEIR dataset, score exact search and the index's two-stage settings, print a table.

    Two-stage settings (when `two_stage` and `index` is importable): coarse="binary" at each
    `oversampling`, coarse="pq", coarse="flat", each in a temporary collection.
    """
    ds = load_beir(folder)
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{Path(folder).resolve()}|{len(ds.doc_ids)}|{encoder.fingerprint}".encode()
        ).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"corpus-{ds.name}-{encoder.name}-{key}.npy"
    docs = embed_corpus(encoder, ds.doc_texts, batch_size=batch_size, cache_file=cache_file,
                        progress=progress)
    t0 = time.perf_counter()
    queries = encoder.encode(ds.query_texts, batch_size=batch_size)
    logger.info("%d queries embedded in %.1f s", len(ds.query_texts), time.perf_counter() - t0)

    rows: list[EvalRow] = []
    t0 = time.perf_counter()
    top = exact_search(queries, docs, 100)
    ms = (time.perf_counter() - t0) * 1000 / len(queries)
    run = [[ds.doc_ids[j] for j in row] for row in top]
    rows.append(EvalRow("exact (numpy)", *score_run(run, ds.query_ids, ds.qrels), ms))

    if two_stage:
        rows.extend(_two_stage_rows(ds, docs, queries, oversampling))
    print_table(rows, title=f"{ds.name}: {len(ds.doc_ids)} docs, {len(ds.query_ids)} queries, "
                f"encoder {encoder.name}", out=out)
    return rows


def _two_stage_rows(
    ds: BeirDataset, docs: np.ndarray, queries: np.ndarray, oversampling: Iterable[float]
) -> list[EvalRow]:
    try:
        from index import Collection, CollectionConfig
    except ImportError as exc:
        logger.warning("index library not importable (%s): two-stage settings skipped", exc)
        return []
    settings: list[tuple[str, str, float | None]] = [
        (f"binary, oversampling {o:g}", "binary", float(o)) for o in oversampling
    ]
    settings += [("pq", "pq", None), ("flat", "flat", None)]
    rows: list[EvalRow] = []
    with tempfile.TemporaryDirectory(prefix="tandem-eval-") as tmp:
        built: dict[str, Any] = {}
        try:
            for label, coarse, over in settings:
                col = built.get(coarse)
                if col is None:
                    cfg = CollectionConfig(dim=docs.shape[1], metric="cosine", coarse=coarse)
                    col = Collection.create(Path(tmp) / coarse, cfg)
                    for start in range(0, len(ds.doc_ids), 4096):
                        col.upsert(ds.doc_ids[start : start + 4096], docs[start : start + 4096])
                    built[coarse] = col
                t0 = time.perf_counter()
                res = col.search_detailed(queries, k=100, oversampling=over)
                ms = (time.perf_counter() - t0) * 1000 / len(queries)
                run = [[str(h.id) for h in hits] for hits in res.hits]
                rows.append(EvalRow(label, *score_run(run, ds.query_ids, ds.qrels), ms,
                                    candidates=res.candidates))
        finally:
            for col in built.values():
                col.close()
    return rows


def run_http_eval(
    folder: Path,
    url: str,
    *,
    api_key: str | None = None,
    modes: Sequence[str] = ("dense", "sparse", "hybrid"),
    encoder: str = "minilm",
    collection: str | None = None,
    batch: int = 8,
    out: Any = None,
) -> list[EvalRow]:
    """Score a BEIR dataset through a running server: the corpus ingested as text into a collection
    with a sparse stage (once: an existing collection of that name is reused), then every query
    through ``POST .../search/batch`` in each mode, ``k`` = 100. ms/query is the wall time per
    query of the batched requests (encoding included)."""
    from service.client import Client

    ds = load_beir(folder)
    name = collection or f"eval-{ds.name}"
    rows: list[EvalRow] = []
    with Client(url, api_key=api_key, timeout=600) as client:
        if name not in {c["name"] for c in client.collections()}:
            client.create_collection(name, encoder=encoder, sparse=True)
            lines = (json.dumps({"id": i, "text": t}).encode() + b"\n"
                     for i, t in zip(ds.doc_ids, ds.doc_texts, strict=True))
            t0 = time.perf_counter()
            state = list(client.follow(client.ingest(name, lines)))[-1]
            if state["state"] != "completed" or state["points_committed"] != len(ds.doc_ids):
                raise RuntimeError(f"ingesting {ds.name} into {name!r} ended {state['state']}: {state}")
            logger.info("%d documents ingested in %.1f s", len(ds.doc_ids), time.perf_counter() - t0)
        for mode in modes:
            run: list[list[str]] = []
            t0 = time.perf_counter()
            for start in range(0, len(ds.query_texts), batch):
                searches = [{"text": q, "k": 100, "mode": mode, "with_payload": False}
                            for q in ds.query_texts[start : start + batch]]
                answer = client.request("POST", f"/collections/{name}/search/batch", json={"searches": searches})
                run += [[str(h["id"]) for h in r["hits"]] for r in answer["results"]]
            ms = (time.perf_counter() - t0) * 1000 / len(ds.query_texts)
            rows.append(EvalRow(f"http {mode}", *score_run(run, ds.query_ids, ds.qrels), ms))
    print_table(rows, title=f"{ds.name} through {url} (collection {name!r}, encoder {encoder})", out=out)
    return rows


def print_table(rows: Sequence[EvalRow], *, title: str = "", out: Any = None) -> None:
    """Print rows as a fixed-width table (to stdout unless `out` is given)."""
    out = out or sys.stdout
    if title:
        print(title, file=out)
    print(f"{'method':<28} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'ms/query':>9} {'cand.':>7}",
          file=out)
    for r in rows:
        cand = "" if r.candidates is None else str(r.candidates)
        print(f"{r.method:<28} {r.ndcg_at_10:>8.5f} {r.recall_at_100:>8.4f} {r.mrr_at_10:>8.4f} "
              f"{r.ms_per_query:>9.3f} {cand:>7}", file=out)


def run_eval_cli(
    dataset: Path,
    models_dir: Path,
    *,
    model: str = "minilm",
    threads: int | None = None,
    quantized: bool = False,
    cache_dir: Path | None = None,
    two_stage: bool = True,
    batch_size: int = 64,
) -> list[EvalRow]:
    """Entry point for `tandem eval --dataset PATH --models-dir DIR`."""
    from service.encoder import TextEncoder

    encoder = TextEncoder.load(Path(models_dir) / model, threads=threads, quantized=quantized)
    if cache_dir is None:
        # Inside models/, which git ignores; the dot keeps it apart from the model folders.
        cache_dir = Path(models_dir) / ".cache"
    return run_eval(dataset, encoder, batch_size=batch_size, cache_dir=cache_dir,
                    two_stage=two_stage)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}.jsonl or {stem}.jsonl.gz")


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
