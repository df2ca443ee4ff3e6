"""HTTP benchmark of the service: search QPS and latency, vector and text ingestion rates.

    python -m benchmarks.service_bench [--duration 15] [--clients 16] [--text-docs 3000]

Starts `tandem serve` in a subprocess on a loopback port with a temporary data directory and
drives it from this process (a separate process) with a minimal asyncio HTTP/1.1 client, so
that the load generator costs little CPU beside the server on a small machine:
1. vector ingestion: the 117,659 WordNet gloss embeddings (benchmarks/corpora.py), PUT in
   batches of 1,024 points with base64 float32 vectors, 2 connections; plus the first 20,480
   as JSON numbers into another collection, for comparison;
2. text and vector search, closed loop, at 1 and at `--clients` concurrent connections;
3. text ingestion: `--text-docs` glosses through POST .../ingest (NDJSON), beside the raw
   encoder's docs/s on the same texts (TextEncoder.encode in this process, same batch size),
   measured in the same run while the server is idle.
Writes benchmarks/results/service.json and service.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, ROOT, gloss_embeddings, gloss_texts, machine, models_dir, write_result

BATCH = 1024


# -- a tiny keep-alive HTTP/1.1 client ------------------------------------------------------------
def request_bytes(method: str, path: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**24)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, data: bytes) -> tuple[int, bytes]:
        self.writer.write(data)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def closed_loop(port: int, bodies: list[bytes], clients: int, duration: float) -> dict[str, Any]:
    """`clients` connections, each sending the next body as soon as its last one is answered."""
    conns = [await Conn.open(port) for _ in range(clients)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration
    counter = 0

    async def worker(conn: Conn) -> None:
        nonlocal counter
        while time.perf_counter() < deadline:
            body = bodies[counter % len(bodies)]
            counter += 1
            t = time.perf_counter()
            status, _ = await conn.send(body)
            latencies.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "qps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "statuses": {str(k): v for k, v in statuses.items()}}


async def send_all(port: int, bodies: list[bytes], connections: int) -> float:
    """Send every body (PUTs), `connections` at a time; returns the wall time in seconds."""
    queue = list(reversed(bodies))
    conns = [await Conn.open(port) for _ in range(connections)]

    async def worker(conn: Conn) -> None:
        while queue:
            status, out = await conn.send(queue.pop())
            if status != 200:
                raise RuntimeError(f"upsert answered {status}: {out[:300]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    for c in conns:
        c.close()
    return time.perf_counter() - t0


async def call(port: int, method: str, path: str, body: Any = None, raw: bytes | None = None,
               content_type: str = "application/json") -> tuple[int, Any]:
    conn = await Conn.open(port)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        status, out = await conn.send(request_bytes(method, path, payload, content_type))
        return status, json.loads(out) if out else None
    finally:
        conn.close()


# -- the run ------------------------------------------------------------------------------------------
def start_server(data_dir: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--models-dir", str(models_dir()), *flags]  # defaults: access log on
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(data_dir.parent / "server.log", "wb"))  # noqa: SIM115
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def run_against_server(measure: Callable[[int], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``measure(port)`` against a fresh server on a free loopback port with a temporary data
    directory, stopped (SIGTERM) and removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(tmp / "data", port)
    try:
        return asyncio.run(measure(port))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


def b64(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()


async def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    vectors = gloss_embeddings()[: args.limit]
    texts = gloss_texts()[: args.limit]
    n = len(vectors)
    rng = np.random.default_rng(7)
    out: dict[str, Any] = {"corpus": f"{n} WordNet glosses, MiniLM 384-d", "machine": machine(),
                           "loadavg_at_start": os.getloadavg()}  # the machine is shared: say how busy

    # 1. vector ingestion
    assert (await call(port, "PUT", "/collections/glosses", {"encoder": "minilm"}))[0] == 201
    bodies = [
        request_bytes("PUT", "/collections/glosses/points", json.dumps(
            {"points": [{"id": i, "vector": b64(vectors[i])} for i in range(s, min(s + BATCH, n))]}).encode())
        for s in range(0, n, BATCH)
    ]
    seconds = await send_all(port, bodies, connections=2)
    out["vector_ingest_base64"] = {"points": n, "seconds": round(seconds, 2), "points_per_s": round(n / seconds)}
    print("vector ingestion (base64):", out["vector_ingest_base64"], flush=True)
    m = min(20 * BATCH, n // BATCH * BATCH)
    assert (await call(port, "PUT", "/collections/glosses_json", {"dim": 384}))[0] == 201
    bodies = [
        request_bytes("PUT", "/collections/glosses_json/points", json.dumps(
            {"points": [{"id": s + j, "vector": v}
                        for j, v in enumerate(np.round(vectors[s:s + BATCH], 6).tolist())]}).encode())
        for s in range(0, m, BATCH)
    ]
    seconds = await send_all(port, bodies, connections=2)
    out["vector_ingest_json"] = {"points": m, "seconds": round(seconds, 2), "points_per_s": round(m / seconds)}
    print("vector ingestion (JSON numbers):", out["vector_ingest_json"], flush=True)
    del bodies

    # 2. search
    picks = rng.choice(n, size=2000, replace=False)
    text_bodies = [request_bytes("POST", "/collections/glosses/search", json.dumps(
        {"text": " ".join(texts[i].split()[:6]), "k": 10}).encode()) for i in picks]
    noise = rng.standard_normal((2000, 384)).astype(np.float32) * 0.02
    vector_bodies = [request_bytes("POST", "/collections/glosses/search", json.dumps(
        {"vector": np.round(vectors[i] + noise[j], 6).tolist(), "k": 10}).encode()) for j, i in enumerate(picks)]
    await closed_loop(port, text_bodies[:50], 4, 2.0)  # warm-up
    out["search"] = {}
    for kind, bodies_ in (("text", text_bodies), ("vector", vector_bodies)):
        for clients in (1, args.clients):
            r = await closed_loop(port, bodies_, clients, args.duration)
            out["search"][f"{kind}_c{clients}"] = r
            print(f"{kind} search, {clients} clients:", r, flush=True)

    # 3. text ingestion beside the raw encoder, on the same texts
    sample = [texts[i] for i in rng.choice(n, size=args.text_docs, replace=False)]
    assert (await call(port, "PUT", "/collections/gloss_text", {"encoder": "minilm"}))[0] == 201
    ndjson = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(sample)).encode()
    t0 = time.perf_counter()
    status, accepted = await call(port, "POST", "/collections/gloss_text/ingest", raw=ndjson,
                                  content_type="application/x-ndjson")
    assert status == 202, accepted
    while True:
        _, job = await call(port, "GET", f"/jobs/{accepted['job_id']}")
        if job["state"] != "running":
            break
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    assert job["state"] == "completed" and job["points_committed"] == len(sample), job
    out["text_ingest"] = {"docs": len(sample), "job_docs_per_s": job["rate_per_s"],
                          "end_to_end_docs_per_s": round(len(sample) / wall, 1)}
    from service.encoder import TextEncoder

    encoder = TextEncoder.load(models_dir() / "minilm")
    encoder.encode(sample[:64])
    t0 = time.perf_counter()
    encoder.encode(sample, batch_size=64)
    raw_rate = len(sample) / (time.perf_counter() - t0)
    out["raw_encoder_docs_per_s"] = round(raw_rate, 1)
    out["text_ingest"]["ratio_to_raw_encoder"] = round(out["text_ingest"]["end_to_end_docs_per_s"] / raw_rate, 3)
    print("text ingestion:", out["text_ingest"], "raw encoder docs/s:", out["raw_encoder_docs_per_s"], flush=True)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    s = result["search"]
    names = list(s)
    axes[0].bar(names, [s[k]["qps"] for k in names], color="tab:blue")
    axes[0].set_title("search QPS (closed loop)")
    axes[0].tick_params(axis="x", rotation=30)
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, [s[k]["p50_ms"] for k in names], 0.4, label="p50")
    axes[1].bar(x + 0.2, [s[k]["p99_ms"] for k in names], 0.4, label="p99")
    axes[1].set_xticks(x, names, rotation=30)
    axes[1].set_title("search latency (ms)")
    axes[1].legend()
    ing = {"vectors base64\n(points/s)": result["vector_ingest_base64"]["points_per_s"],
           "vectors JSON\n(points/s)": result["vector_ingest_json"]["points_per_s"]}
    axes[2].bar(list(ing), list(ing.values()), color="tab:green")
    ax2 = axes[2].twinx()
    ax2.bar(["text ingest\n(docs/s)", "raw encoder\n(docs/s)"],
            [result["text_ingest"]["end_to_end_docs_per_s"], result["raw_encoder_docs_per_s"]], color="tab:orange")
    axes[2].set_title("ingestion")
    fig.suptitle(f"tandem service, {result['machine']['cpus']} CPUs, {result['corpus']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per search measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--text-docs", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=None, help="first N glosses only (a quick smoke run)")
    parser.add_argument("--out", default="service", help="result name: benchmarks/results/<out>.json/.png")
    args = parser.parse_args()
    result = run_against_server(lambda port: run(args, port))
    result["args"] = vars(args)
    result["loadavg_at_end"] = os.getloadavg()
    print("wrote", write_result(args.out, result))
    plot(result, RESULTS / f"{args.out}.png")
    print("wrote", RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
