"""Bulk ingestion in cluster mode: files read and encoded with Ray Data, loaded shard by shard.

``POST /collections/{name}/ingest/files`` on a router runs ``load_files`` in its job thread:

1. Ray Data reads each file (``read_binary_files`` for NDJSON, split on newlines as a single
   node does, a file at a time in memory; ``read_parquet``, whose rows become NDJSON lines as on
   a single node, ``service.files.point_line``), on any node: the files must be at the same path
   on every node (a shared volume).
2. ``map_batches`` on an actor pool (``Encode``: today's onnxruntime encoder, one thread and one
   CPU per actor, 1 to ``max_actors`` actors) parses the lines and encodes the texts of points
   that have no vector.
3. The router takes the encoded rows in file order (``preserve_order``), numbers the lines, and
   commits them chunk by chunk through the ingestion job's own checks
   (``Ingestor.commit``): each chunk is split by shard and written to every copy of each shard
   (``ShardedCollection.upsert``), with the write quorum and stale-copy rules of any write.

The job's progress (lines read, points committed, rate, bad lines with their numbers) is the one
``GET /jobs/{id}`` shows for a single node. A router restart fails the job (it is not resumed);
running it again is harmless, as upserts replace points by id.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from pydantic import ValidationError

from service.encoder import TextEncoder
from service.files import InputFile, point_line
from service.jobs import Job
from service.registry import OpenCollection
from service.schemas import PointIn

if TYPE_CHECKING:
    from service.ingest import Ingestor

logger = logging.getLogger(__name__)

#: Lines per batch handed to an encoder actor.
BATCH = 256


class Encode:
    """The actor pool's callable: parse each line; encode the texts of points without a vector."""

    def __init__(self, model_dir: str, quantized: bool, providers: list[str] | None, dim: int) -> None:
        self.encoder = TextEncoder.load(model_dir, threads=1, quantized=quantized, providers=providers)
        self.dim = dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = batch["line"]
        rows, texts = [], []
        for i, line in enumerate(lines):
            try:
                point = PointIn.model_validate_json(line)
            except ValidationError:
                continue  # the router reports it, with its line number
            if point.text is not None and point.vector is None and point.vectors is None:
                rows.append(i)
                texts.append(point.text)
        vectors = np.zeros((len(lines), self.dim), dtype=np.float32)
        encoded = np.zeros(len(lines), dtype=bool)
        if texts and self.encoder.dim == self.dim:
            vectors[rows] = self.encoder.encode(texts, batch_size=64)
            encoded[rows] = True
        return {**batch, "vector": vectors, "encoded": encoded}


def _parquet_lines(batch: Any) -> dict[str, np.ndarray]:
    lines = [point_line(row)[:-1] for row in batch.drop_columns(["path"]).to_pylist()]
    return {"line": _objects(lines), "path": batch.column("path").to_numpy(zero_copy_only=False)}


def _ndjson_lines(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Whole files into lines as a single node reads them: split on newlines only (a JSON
    string may hold U+2028), as bytes (a line of bad UTF-8 is one bad line, not a failed job)."""
    lines: list[bytes] = []
    paths: list[str] = []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        parts = bytes(data).split(b"\n")
        if parts and parts[-1] == b"":
            parts.pop()  # the newline that ends the last line
        lines += parts
        paths += [str(path)] * len(parts)
    return {"line": _objects(lines), "path": _objects(paths)}


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _runs(files: list[InputFile]) -> list[list[InputFile]]:
    """Consecutive files of one format: each run is one Ray Data read (in file order)."""
    runs: list[list[InputFile]] = []
    for f in files:
        if runs and runs[-1][0].format == f.format:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


def files_loader(model_dir: str | None, *, quantized: bool, providers: list[str] | None,
                 max_actors: int) -> Any:
    """The ``load_files`` of cluster mode (``service.runtime.Runtime``). ``model_dir``: the
    encoder the actors load (None: none; texts are encoded by the router as a single node does)."""
    model = None if model_dir is None else Path(model_dir).name

    def load_files(ingestor: Ingestor, job: Job, opened: OpenCollection, files: list[InputFile]) -> None:
        from service.files import describe

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # lines keep their numbers
        context.enable_progress_bars = False  # the job's state is the progress
        loader = _Loader(ingestor, job, opened)
        for run in _runs(files):
            paths = [str(f.path) for f in run]
            if run[0].format == "ndjson":
                ds = ray.data.read_binary_files(paths, include_paths=True).map_batches(
                    _ndjson_lines, batch_size=1, batch_format="numpy")
            else:
                ds = ray.data.read_parquet(paths, include_paths=True).map_batches(
                    _parquet_lines, batch_format="pyarrow")
            config = opened.collection.config
            # Only for the collection's own encoder: another one is refused line by line, as on a single node.
            if model_dir is not None and opened.encoder == model and config.multivector is None:
                ds = ds.map_batches(
                    Encode, batch_size=BATCH, batch_format="numpy", num_cpus=1,
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
                    fn_constructor_args=(model_dir, quantized, providers, config.dim),
                )
            loader.load(ds, {p: f.name for p, f in zip(paths, run, strict=True)})
        job.message = describe([(f.name, *loader.spans.get(f.name, (1, 0))) for f in files])
        logger.info("ingestion job %s: %s", job.job_id, job.message)

    return load_files


class _Loader:
    """The router's side of a job: lines in order, numbered, checked and committed in chunks."""

    def __init__(self, ingestor: Ingestor, job: Job, opened: OpenCollection) -> None:
        self.ingestor, self.job, self.opened = ingestor, job, opened
        self.number = 0
        self.spans: dict[str, tuple[int, int]] = {}  # file name -> (first line, last line)

    def load(self, ds: Any, names: dict[str, str]) -> None:
        from service.ingest import first_problem

        ingestor, job, opened = self.ingestor, self.job, self.opened
        limit = ingestor.runtime.settings.max_line_bytes
        chunk_points = ingestor.runtime.settings.ingest_chunk_points
        chunk: dict[Any, tuple[int, PointIn]] = {}
        encoded: dict[int, np.ndarray] = {}
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
            if ingestor.stopping:
                raise RuntimeError(f"stopped by a shutdown after line {self.number}: run the job again")
            has_vectors = "encoded" in batch
            for i, line in enumerate(batch["line"]):
                self.number = number = self.number + 1
                name = names.get(str(batch["path"][i]), str(batch["path"][i]))
                self.spans[name] = (self.spans.get(name, (number, 0))[0], number)
                job.lines_read = number
                if len(line) > limit:
                    ingestor.fail(job, number, f"line longer than {limit} bytes (--max-line-bytes)")
                    continue
                if not line.strip():
                    continue
                try:
                    point = PointIn.model_validate_json(line)
                except ValidationError as exc:
                    ingestor.fail(job, number, first_problem(exc))
                    continue
                if point.id in chunk:  # the later line wins, as if one by one
                    ingestor.commit(job, opened, chunk, encoded)
                    encoded = {}
                chunk[point.id] = (number, point)
                if has_vectors and batch["encoded"][i]:
                    encoded[number] = batch["vector"][i]
                if len(chunk) >= chunk_points:
                    ingestor.commit(job, opened, chunk, encoded)
                    encoded = {}
        if chunk:
            ingestor.commit(job, opened, chunk, encoded)
