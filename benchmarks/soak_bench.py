"""Soak and overload: a steady mix of searches and ingestion at ~80% of capacity, then past it.

    python -m benchmarks.soak_bench [--minutes 5] [--load 0.8] [--calibrate-s 20] [--overload-s 15]

Starts `tandem serve` (MiniLM encoder) on loopback and drives it from this process:
1. a `soak` collection of the 117,659 gloss embeddings (`--synthetic N`: N random vectors
   instead, for a quick run) and an empty `ingest` collection;
2. calibration: the request mix, closed loop on 16 connections for --calibrate-s: the most
   requests per second answered 200;
3. soak: the same mix, open loop (requests sent on a fixed schedule whatever the answers) at
   --load x that rate for --minutes, plus an NDJSON job of 5,000 vectors every minute. The
   server's resident memory is sampled every 2 s;
4. overload: 3x the calibrated rate for --overload-s: how much is shed with 429, and how fast.
The mix: 70% text searches, 20% vector searches, 10% upserts of 16 vectors (wait=true).
Writes benchmarks/results/soak.json and soak.png: per 30 s window the rate, p50 and p99, the
statuses; memory over time; the overload's answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, gloss_texts, machine, write_result
from benchmarks.service_bench import BATCH, Conn, b64, call, request_bytes, send_all, start_server

WINDOW_S = 30.0
MAX_CONNECTIONS = 2048
#: uvicorn closes a keep-alive connection idle for 5 s; like HTTP client libraries, the pool
#: drops its idle connections before that instead of sending on one the server is closing.
IDLE_S = 4.0


class Mix:
    """Request bodies for the mix, drawn in a fixed pseudo-random order."""

    def __init__(self, vectors: np.ndarray, texts: list[str], seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(vectors), size=min(2000, len(vectors)), replace=False)
        self.text = [request_bytes("POST", "/collections/soak/search", json.dumps(
            {"text": " ".join(texts[i].split()[:6]), "k": 10}).encode()) for i in picks]
        noise = rng.standard_normal((len(picks), vectors.shape[1])).astype(np.float32) * 0.02
        self.vector = [request_bytes("POST", "/collections/soak/search", json.dumps(
            {"vector": b64(vectors[i] + noise[j]), "k": 10}).encode()) for j, i in enumerate(picks)]
        self.dim = vectors.shape[1]
        self.kinds = rng.choice(["text", "vector", "upsert"], size=100_000, p=[0.7, 0.2, 0.1])
        self.n = 0

    def next(self) -> tuple[str, bytes]:
        kind = str(self.kinds[self.n % len(self.kinds)])
        i = self.n
        self.n += 1
        if kind == "upsert":
            v = np.random.default_rng(i).standard_normal((16, self.dim)).astype(np.float32)
            body = json.dumps({"points": [{"id": f"u{i}-{j}", "vector": b64(v[j]), "payload": {"i": i}}
                                          for j in range(16)]}).encode()
            return kind, request_bytes("PUT", "/collections/ingest/points?wait=true", body)
        bodies = self.text if kind == "text" else self.vector
        return kind, bodies[i % len(bodies)]


class Pool:
    """Idle keep-alive connections; a new one when none is idle, up to MAX_CONNECTIONS open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[float, Conn]] = []
        self.open = 0

    async def get(self) -> Conn | None:
        """A connection, or None when MAX_CONNECTIONS requests are already outstanding."""
        now = time.perf_counter()
        while self.idle:
            since, conn = self.idle.pop()
            if now - since < IDLE_S:
                return conn
            self.close(conn)
        if self.open >= MAX_CONNECTIONS:
            return None
        self.open += 1
        try:
            return await Conn.open(self.port)
        except OSError:
            self.open -= 1
            raise

    def put(self, conn: Conn) -> None:
        self.idle.append((time.perf_counter(), conn))

    def close(self, conn: Conn) -> None:
        conn.close()
        self.open -= 1


async def closed_loop_mix(port: int, mix: Mix, clients: int, seconds: float) -> float:
    """Requests per second answered 200, `clients` connections each sending back to back."""
    conns = [await Conn.open(port) for _ in range(clients)]
    ok = 0
    deadline = time.perf_counter() + seconds

    async def worker(conn: Conn) -> None:
        nonlocal ok
        while time.perf_counter() < deadline:
            status, _ = await conn.send(mix.next()[1])
            ok += status == 200

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    return ok / elapsed


async def open_loop(
    port: int, mix: Mix, rate: float, seconds: float, *, timeout: float = 30.0
) -> list[tuple[float, str, int, float]]:
    """Send at `rate` requests/s on a fixed schedule for `seconds`; returns (sent at, kind,
    status, latency s) per request; status 0 = no answer within `timeout`, -1 = connection error,
    -2 = not sent: MAX_CONNECTIONS requests outstanding."""
    pool = Pool(port)
    records: list[tuple[float, str, int, float]] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()

    async def one(kind: str, body: bytes, sent: float) -> None:
        try:
            conn = await pool.get()
        except OSError:
            records.append((sent - t0, kind, -1, time.perf_counter() - sent))
            return
        if conn is None:
            records.append((sent - t0, kind, -2, 0.0))
            return
        try:
            status, _ = await asyncio.wait_for(conn.send(body), timeout)
        except TimeoutError:
            records.append((sent - t0, kind, 0, time.perf_counter() - sent))
            pool.close(conn)
            return
        except (OSError, asyncio.IncompleteReadError):
            records.append((sent - t0, kind, -1, time.perf_counter() - sent))
            pool.close(conn)
            return
        records.append((sent - t0, kind, status, time.perf_counter() - sent))
        pool.put(conn)

    i = 0
    while (due := t0 + i / rate) < t0 + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        kind, body = mix.next()
        task = asyncio.create_task(one(kind, body, time.perf_counter()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.gather(*tasks)
    for _, c in pool.idle:
        c.close()
    return records


def rss_bytes(pid: int) -> tuple[int, int]:
    """Resident bytes of the process: all of it, and the anonymous part (heap, not file pages:
    vectors read through the memory map count in the first, and the kernel may drop them)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


def windows(records: list[tuple[float, str, int, float]], width: float) -> list[dict[str, Any]]:
    out = []
    if not records:
        return out
    end = max(r[0] for r in records)
    for start in np.arange(0, end + 1e-9, width):
        inside = [r for r in records if start <= r[0] < start + width]
        ok = np.array([r[3] for r in inside if r[2] == 200]) * 1000
        statuses: dict[str, int] = {}
        for r in inside:
            statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
        out.append({"start_s": float(start), "sent_per_s": round(len(inside) / width, 1),
                    "ok_per_s": round(len(ok) / width, 1),
                    "p50_ms": round(float(np.percentile(ok, 50)), 2) if len(ok) else None,
                    "p99_ms": round(float(np.percentile(ok, 99)), 2) if len(ok) else None,
                    "statuses": statuses})
    return out


async def ingest_jobs(port: int, dim: int, every_s: float, stop: asyncio.Event) -> list[dict[str, Any]]:
    jobs = []
    n = 0
    while not stop.is_set():
        v = np.random.default_rng(10**6 + n).standard_normal((5000, dim)).astype(np.float32)
        body = "".join(json.dumps({"id": f"j{n}-{i}", "vector": b64(v[i])}) + "\n" for i in range(5000)).encode()
        status, accepted = await call(port, "POST", "/collections/ingest/ingest", raw=body,
                                      content_type="application/x-ndjson")
        jobs.append({"status": status, "job_id": accepted.get("job_id") if isinstance(accepted, dict) else None})
        n += 1
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass
    return jobs


async def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    if args.synthetic:
        vectors = np.random.default_rng(0).standard_normal((args.synthetic, 384)).astype(np.float32)
        texts = [f"synthetic document number {i} about topic {i % 97}" for i in range(args.synthetic)]
        corpus = f"{args.synthetic} random 384-d vectors"
    else:
        vectors, texts = gloss_embeddings(), gloss_texts()
        corpus = f"{len(vectors)} WordNet glosses, MiniLM 384-d"
    out: dict[str, Any] = {"corpus": corpus, "machine": machine(), "args": vars(args)}
    assert (await call(port, "PUT", "/collections/soak", {"encoder": "minilm"}))[0] == 201
    assert (await call(port, "PUT", "/collections/ingest", {"dim": 384}))[0] == 201
    n = len(vectors)
    bodies = [request_bytes("PUT", "/collections/soak/points", json.dumps(
        {"points": [{"id": i, "vector": b64(vectors[i])} for i in range(s, min(s + BATCH, n))]}).encode())
        for s in range(0, n, BATCH)]
    await send_all(port, bodies, connections=2)
    del bodies
    mix = Mix(vectors, texts)
    await closed_loop_mix(port, mix, 4, 2.0)  # warm-up
    capacity = await closed_loop_mix(port, mix, 16, args.calibrate_s)
    rate = args.load * capacity
    out["calibration"] = {"clients": 16, "seconds": args.calibrate_s, "max_ok_per_s": round(capacity, 1)}
    print(f"capacity {capacity:.1f} requests/s; soaking at {rate:.1f}/s for {args.minutes} min", flush=True)

    memory: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    t0 = time.perf_counter()

    async def sample() -> None:
        while not stop.is_set():
            memory.append((time.perf_counter() - t0, *rss_bytes(pid)))
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    jobs = asyncio.create_task(ingest_jobs(port, 384, 60.0, stop))
    records = await open_loop(port, mix, rate, args.minutes * 60)
    stop.set()
    await sampler
    job_list = await jobs
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    per_window = windows(records, WINDOW_S)
    def growth(column: int) -> tuple[float, float]:
        first = float(np.median([m[column] for m in memory if m[0] <= 60]))
        last = float(np.median([m[column] for m in memory if m[0] >= memory[-1][0] - 60]))
        return first, last

    rss_first_min, rss_last = growth(1)
    anon_first_min, anon_last = growth(2)
    ok = [r for r in records if r[2] == 200]
    first = np.array([r[3] for r in ok if r[0] < 60]) * 1000
    last = np.array([r[3] for r in ok if r[0] >= args.minutes * 60 - 60]) * 1000
    job_states = []
    for j in job_list:
        if j["job_id"]:
            while (state := (await call(port, "GET", f"/jobs/{j['job_id']}"))[1])["state"] == "running":
                await asyncio.sleep(0.2)
            job_states.append(state["state"])
    out["soak"] = {
        "rate_per_s": round(rate, 1), "seconds": args.minutes * 60, "requests": len(records),
        "statuses": statuses, "errors_other_than_429": sum(v for k, v in statuses.items() if k not in ("200", "429")),
        "p50_ms": round(float(np.percentile([r[3] for r in ok], 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile([r[3] for r in ok], 99)) * 1000, 2),
        "p99_first_minute_ms": round(float(np.percentile(first, 99)), 2) if len(first) else None,
        "p99_last_minute_ms": round(float(np.percentile(last, 99)), 2) if len(last) else None,
        "rss_first_minute_mb": round(rss_first_min / 2**20, 1), "rss_last_minute_mb": round(rss_last / 2**20, 1),
        "rss_growth": round(rss_last / rss_first_min - 1, 4),
        "anon_first_minute_mb": round(anon_first_min / 2**20, 1), "anon_last_minute_mb": round(anon_last / 2**20, 1),
        "anon_growth": round(anon_last / anon_first_min - 1, 4),
        "ingest_jobs": {"sent": len(job_list), "states": {s: job_states.count(s) for s in set(job_states)}},
        "windows": per_window,
        "memory": [(round(t, 1), rss, anon) for t, rss, anon in memory],
    }
    print({k: v for k, v in out["soak"].items() if k not in ("windows", "memory")}, flush=True)

    if args.overload_s:
        burst = await open_loop(port, mix, 3 * capacity, args.overload_s)
        by: dict[str, list[float]] = {}
        for r in burst:
            by.setdefault(str(r[2]), []).append(r[3] * 1000)
        out["overload"] = {
            "rate_per_s": round(3 * capacity, 1), "seconds": args.overload_s, "requests": len(burst),
            "statuses": {k: len(v) for k, v in by.items()},
            "latency_ms_by_status": {k: {"p50": round(float(np.percentile(v, 50)), 2),
                                         "p99": round(float(np.percentile(v, 99)), 2)} for k, v in by.items()},
        }
        print("overload:", out["overload"], flush=True)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    soak = result["soak"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    w = soak["windows"]
    xs = [x["start_s"] / 60 for x in w]
    ax1.plot(xs, [x["p50_ms"] for x in w], "o-", label="p50")
    ax1.plot(xs, [x["p99_ms"] for x in w], "s-", label="p99")
    ax1.set_xlabel("minutes")
    ax1.set_ylabel("latency of 200 answers, ms (per 30 s)")
    ax1.set_title(f"soak at {soak['rate_per_s']} req/s (mix: 70% text, 20% vector search, 10% upsert)")
    ax1.legend()
    mem = soak["memory"]
    ax2.plot([m[0] / 60 for m in mem], [m[1] / 2**20 for m in mem], label="RSS")
    ax2.plot([m[0] / 60 for m in mem], [m[2] / 2**20 for m in mem], label="anonymous (heap)")
    ax2.set_xlabel("minutes")
    ax2.set_ylabel("server resident memory, MiB")
    ax2.set_title(f"last vs first minute: RSS {soak['rss_growth'] * 100:+.1f}%, "
                  f"anonymous {soak['anon_growth'] * 100:+.1f}%")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the calibrated capacity")
    parser.add_argument("--calibrate-s", type=float, default=20.0)
    parser.add_argument("--overload-s", type=float, default=15.0)
    parser.add_argument("--synthetic", type=int, default=0, help="N random vectors instead of the glosses")
    parser.add_argument("--no-write", action="store_true", help="print only (the tests' short run)")
    parser.add_argument("--out", default="soak", help="result name: benchmarks/results/<out>.json/.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tandem-soak-") as tmp:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = start_server(Path(tmp) / "data", port)
        try:
            result = asyncio.run(run(args, port, proc.pid))
        finally:
            proc.terminate()
            result_code = proc.wait(60)
        result["server_exit"] = result_code
    if not args.no_write:
        write_result(args.out, result)
        plot(result, RESULTS / f"{args.out}.png")
    summary = {k: v for k, v in result.items() if k != "soak"} | {
        "soak": {k: v for k, v in result["soak"].items() if k not in ("windows", "memory")}}
    print("SOAK-RESULT", json.dumps(summary))  # one line: tests/test_soak.py reads it


if __name__ == "__main__":
    main()
