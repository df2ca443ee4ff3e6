"""Files on the server's disk as ingestion input: ``POST /collections/{name}/ingest/files``.

Only files under ``--import-dir`` are read (a request names paths relative to it). Two formats,
by suffix:

- ``.ndjson`` / ``.jsonl``: one point per line, the shape of ``PUT .../points``' items.
- ``.parquet``: one point per row; columns ``id``, ``text`` or ``vector``, and ``payload`` (a
  struct or a JSON string) or else every other column into the payload.

A single node turns the files into one NDJSON body and runs it as an ingestion job; cluster mode
reads them with Ray Data (``service.cluster.bulk``). Either way the job numbers lines across the
files in the order given (its message says which lines came from which file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from service.errors import Forbidden, NotFound, Unprocessable

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
PARQUET_SUFFIXES = (".parquet",)
_NATIVE = {"id", "text", "vector", "vectors", "payload"}


@dataclass(frozen=True)
class InputFile:
    path: Path  # resolved, inside the import folder
    name: str  # as the request gave it
    format: str  # "ndjson" or "parquet"
    size: int


def resolve(import_dir: Path | None, names: list[str]) -> list[InputFile]:
    """The named files, checked: inside ``import_dir``, existing, of a known format."""
    if import_dir is None:
        raise Forbidden("file ingestion is off on this server: start it with --import-dir (TANDEM_IMPORT_DIR) "
                        "and name files under that folder, or stream the points to POST .../ingest")
    root = import_dir.resolve()
    files = []
    for name in names:
        if "\x00" in name:
            raise Unprocessable(f"{name!r}: a path may not hold a NUL character")
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise Forbidden(f"{name!r} is outside the import folder: name a file under --import-dir")
        if not path.is_file():
            raise NotFound(f"{name!r}: no such file under the import folder")
        suffix = path.suffix.lower()
        if suffix in NDJSON_SUFFIXES:
            kind = "ndjson"
        elif suffix in PARQUET_SUFFIXES:
            kind = "parquet"
        else:
            raise Unprocessable(f"{name!r}: unknown format {suffix!r}: use .ndjson / .jsonl or .parquet")
        files.append(InputFile(path, name, kind, path.stat().st_size))
    return files


def point_line(row: Any, *, id_field: str = "id", text_field: str = "text", vector_field: str = "vector") -> bytes:
    """One NDJSON line (with its newline) for a table row: the id, text and vector columns, every
    other column into the payload (a row already in tandem's shape is kept as it is)."""
    if isinstance(row, bytes):
        return row + b"\n"
    if not isinstance(row, dict):
        return json.dumps(row).encode() + b"\n"  # not an object: the job says so
    if "payload" in row and set(row) <= _NATIVE and id_field == "id":
        payload = row.get("payload")
        if isinstance(payload, str):  # a JSON string column
            try:
                row = {**row, "payload": json.loads(payload)}
            except ValueError:
                pass  # the job says it is not an object
        return json.dumps({k: v for k, v in row.items() if v is not None}, default=str).encode() + b"\n"
    out: dict[str, Any] = {"id": row.get(id_field)}
    for field, name in ((text_field, "text"), (vector_field, "vector")):
        if row.get(field) is not None:
            out[name] = row[field]
    payload = {k: v for k, v in row.items() if k not in (id_field, text_field, vector_field) and v is not None}
    if payload:
        out["payload"] = payload
    return json.dumps(out, default=str).encode() + b"\n"


def parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise Unprocessable("reading Parquet needs pyarrow on the server: pip install 'tandem[parquet]'") from None
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def write_ndjson(files: list[InputFile], out: BinaryIO) -> list[tuple[str, int, int]]:
    """The files as one NDJSON body into ``out``: ``(name, first line, last line)`` per file."""
    spans = []
    line = 0
    for f in files:
        first = line + 1
        if f.format == "ndjson":
            with open(f.path, "rb") as src:
                for raw in src:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                    line += 1
        else:
            for row in parquet_rows(f.path):
                out.write(point_line(row))
                line += 1
        spans.append((f.name, first, line))
    return spans


def describe(spans: list[tuple[str, int, int]]) -> str:
    return "files: " + ", ".join(f"{name} (lines {a}-{b})" if b >= a else f"{name} (empty)" for name, a, b in spans)
