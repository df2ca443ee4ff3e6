"""The client side of the ``tandem`` command: ``ingest``, ``search`` and ``collections``, talking
to a running server through ``service.client``.

    tandem ingest points.jsonl --collection docs [--id-field id] [--text-field text] [--vector-field vector]
    tandem search --collection docs --text "memory-light retrieval" [--k 10] [--filter '{"must": [...]}']
    tandem collections [NAME]

Each takes ``--url`` and ``--api-key`` (or ``TANDEM_URL`` and ``TANDEM_API_KEY``). ``ingest`` reads
JSONL / NDJSON, CSV or Parquet (Parquet needs ``pyarrow``): one point a row, an id column, a text
or vector column, every other column into the payload. It streams the rows to an ingestion job,
shows its progress (rate and ETA, from the job's state) and exits 1 when any row was refused,
printing why; the rest are loaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from index import errors
from service.client import Client
from service.files import point_line


def add_parsers(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("TANDEM_URL", "http://localhost:8000"),
                       help="the server [TANDEM_URL; default: http://localhost:8000]")
        p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"), help="[TANDEM_API_KEY]")

    ing = sub.add_parser("ingest", help="load a JSONL, CSV or Parquet file into a collection, with progress")
    ing.add_argument("file", type=Path)
    ing.add_argument("--collection", required=True)
    ing.add_argument("--id-field", default="id")
    ing.add_argument("--text-field", default="text", help="the column encoded by the collection's encoder")
    ing.add_argument("--vector-field", default="vector", help="a column of vectors (JSON lists in CSV)")
    ing.add_argument("--poll", type=float, default=0.5, help="seconds between progress updates")
    common(ing)
    se = sub.add_parser("search", help="search a collection and print a table of hits")
    se.add_argument("--collection", required=True)
    se.add_argument("--text")
    se.add_argument("--vector", help="a JSON list of numbers")
    se.add_argument("--k", type=int, default=10)
    se.add_argument("--filter", help="a JSON filter")
    se.add_argument("--target-recall", type=float, help="the recall@10 to reach (the server picks the setting)")
    common(se)
    co = sub.add_parser("collections", help="list the collections, or describe one")
    co.add_argument("name", nargs="?")
    common(co)


def run(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, api_key=args.api_key) as client:
            if args.command == "ingest":
                return ingest(client, args)
            if args.command == "search":
                return search(client, args)
            return collections(client, args)
    except (errors.TandemError, httpx.HTTPError, OSError, ValueError, ImportError) as exc:
        print(f"tandem {args.command}: {exc}", file=sys.stderr)
        return 2


# -- ingest ---------------------------------------------------------------------------------------
def _cell(text: str) -> Any:
    """A CSV cell: JSON when it parses as a number, boolean, list or object; else the string."""
    if text == "":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if not isinstance(value, str) else text


def rows(path: Path) -> tuple[int, Iterator[Any]]:
    """The number of rows and an iterator over them: dicts, or for a JSONL line that does not
    parse its raw text (sent as is, so that the job reports it with its line number)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, "rb") as f:
            total = sum(1 for line in f if line.strip())

        def jsonl() -> Iterator[Any]:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            yield line.rstrip(b"\r\n")
        return total, jsonl()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as text:
            total = max(0, sum(1 for _ in csv.reader(text)) - 1)

        def table() -> Iterator[Any]:
            with open(path, newline="", encoding="utf-8") as text:
                for row in csv.DictReader(text):
                    yield {k: _cell(v) for k, v in row.items() if k is not None}
        return total, table()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
        parquet = pq.ParquetFile(path)

        def batches() -> Iterator[Any]:
            for batch in parquet.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        return parquet.metadata.num_rows, batches()
    raise ValueError(f"{path}: unknown format {suffix!r}: use .jsonl / .ndjson, .csv or .parquet")


def point(row: Any, args: argparse.Namespace) -> bytes:
    """One NDJSON line for the ingestion job."""
    return point_line(row, id_field=args.id_field, text_field=args.text_field, vector_field=args.vector_field)


def ingest(client: Client, args: argparse.Namespace) -> int:
    total, found = rows(args.file)
    t0 = time.perf_counter()
    job_id = client.ingest(args.collection, (point(row, args) for row in found))
    state: dict[str, Any] = {}
    with tqdm(total=total, unit="pt", desc=f"ingest {args.file.name}", file=sys.stderr) as bar:
        for state in client.follow(job_id, args.poll):
            bar.update(state["lines_read"] - bar.n)
            bar.set_postfix(committed=state["points_committed"], errors=state["error_count"])
    took = time.perf_counter() - t0
    print(f"job {job_id}: {state['state']}, {state['points_committed']} points committed from "
          f"{state['lines_read']} lines in {took:.1f} s ({state['points_committed'] / max(took, 1e-9):.0f}/s), "
          f"{state['error_count']} refused")
    for error in state["errors"]:
        print(f"  line {error['line']}: {error['message']}", file=sys.stderr)
    if state.get("message"):
        print(f"  {state['message']}", file=sys.stderr)
    return 0 if state["state"] == "completed" and state["error_count"] == 0 else 1


# -- search and collections -----------------------------------------------------------------------
def search(client: Client, args: argparse.Namespace) -> int:
    vector = json.loads(args.vector) if args.vector else None
    flt = json.loads(args.filter) if args.filter else None
    options = {} if args.target_recall is None else {"target_recall": args.target_recall}
    hits = client.search(args.collection, text=args.text, vector=vector, k=args.k, filter=flt, **options)
    print(f"{'#':>3}  {'score':>8}  {'id':<24}  payload")
    for rank, hit in enumerate(hits, 1):
        payload = json.dumps(hit.get("payload"), ensure_ascii=False)
        print(f"{rank:>3}  {hit['score']:>8.4f}  {str(hit['id']):<24}  {payload[:100]}")
    return 0


def collections(client: Client, args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(client.collection(args.name), indent=2))
        return 0
    print(f"{'name':<24}  {'points':>10}  {'RAM MB':>8}  {'disk MB':>8}  encoder")
    for c in client.collections():
        print(f"{c['name']:<24}  {c['points']:>10}  {c['ram_bytes'] / 2**20:>8.1f}  {c['disk_bytes'] / 2**20:>8.1f}  "
              f"{c.get('encoder') or '-'}")
    return 0
