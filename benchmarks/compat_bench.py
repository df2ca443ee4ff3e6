"""What the foreign dialects cost: the same searches through tandem's own route and through the
Qdrant layer, and embeddings through the OpenAI route beside the encoder in-process.

    python -m benchmarks.compat_bench [--queries 400] [--rounds 5]

Starts `tandem serve` on a loopback port (benchmarks/service_bench.py), loads the 117,659 WordNet
gloss embeddings, then measures single requests one at a time (no concurrency), interleaving the
variants round by round so that both see the same machine:
1. raw HTTP (a minimal keep-alive client): POST /collections/g/search {vector, k: 10} against
   POST /qdrant/collections/g/points/search {vector, limit: 10}; and the Query API;
2. the Python clients in this process: tandem's `Client.search` against qdrant-client's
   `query_points` (REST), both pointed at this server;
3. POST /v1/embeddings of one short text (raw HTTP, and the official `openai` client) against
   `TextEncoder.encode` of the same text in this process.
Writes benchmarks/results/compat.json and compat.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpora import RESULTS, gloss_embeddings, gloss_texts, machine, models_dir, write_result
from benchmarks.service_bench import BATCH, Conn, b64, call, request_bytes, run_against_server, send_all


def p50_ms(samples: list[float]) -> float:
    return round(float(np.median(samples)) * 1000, 3)


async def timed_raw(port: int, bodies: list[bytes]) -> list[float]:
    """One keep-alive connection per block (the server closes one left idle while the clients run)."""
    conn = await Conn.open(port)
    out = []
    for body in bodies:
        t = time.perf_counter()
        status, answer = await conn.send(body)
        out.append(time.perf_counter() - t)
        if status != 200:
            raise RuntimeError(f"answered {status}: {answer[:300]!r}")
    conn.close()
    return out


def timed_calls(fn: Callable[[Any], Any], items: list[Any]) -> list[float]:
    out = []
    for item in items:
        t = time.perf_counter()
        fn(item)
        out.append(time.perf_counter() - t)
    return out


async def load(port: int) -> tuple[np.ndarray, list[str]]:
    vectors, texts = gloss_embeddings(), gloss_texts()
    assert (await call(port, "PUT", "/collections/g", {"encoder": "minilm"}))[0] == 201
    bodies = [request_bytes("PUT", "/collections/g/points", json.dumps(
        {"points": [{"id": i, "vector": b64(vectors[i])} for i in range(s, min(s + BATCH, len(vectors)))]}).encode())
        for s in range(0, len(vectors), BATCH)]
    await send_all(port, bodies, connections=2)
    return vectors, texts


async def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    from openai import OpenAI
    from qdrant_client import QdrantClient

    from service.client import Client
    from service.encoder import TextEncoder

    vectors, texts = await load(port)
    rng = np.random.default_rng(11)
    picks = rng.choice(len(vectors), size=args.queries, replace=False)
    queries = (vectors[picks] + rng.standard_normal((args.queries, 384)).astype(np.float32) * 0.02)
    qlists = np.round(queries, 6).tolist()
    words = [" ".join(texts[i].split()[:8]) for i in picks]
    native = [request_bytes("POST", "/collections/g/search", json.dumps({"vector": q, "k": 10}).encode())
              for q in qlists]
    qdrant = [request_bytes("POST", "/qdrant/collections/g/points/search", json.dumps(
        {"vector": q, "limit": 10, "with_payload": True}).encode()) for q in qlists]
    qquery = [request_bytes("POST", "/qdrant/collections/g/points/query", json.dumps(
        {"query": q, "limit": 10, "with_payload": True}).encode()) for q in qlists]
    embed = [request_bytes("POST", "/v1/embeddings", json.dumps({"input": w, "model": "minilm"}).encode())
             for w in words]

    url = f"http://127.0.0.1:{port}"
    tandem = Client(url)
    qc = QdrantClient(url=url, prefix="qdrant", prefer_grpc=False, timeout=60, check_compatibility=False)
    oai = OpenAI(base_url=f"{url}/v1", api_key="unused")
    encoder = TextEncoder.load(models_dir() / "minilm")
    variants: dict[str, list[float]] = {}

    def add(name: str, samples: list[float]) -> None:
        variants.setdefault(name, []).extend(samples)

    await timed_raw(port, native[:50] + qdrant[:50] + embed[:20])  # warm-up
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        add("http: tandem search", await timed_raw(port, native))
        add("http: qdrant search", await timed_raw(port, qdrant))
        add("http: qdrant query", await timed_raw(port, qquery))
        add("client: tandem Client.search", timed_calls(lambda q: tandem.search("g", vector=q, k=10), qlists))
        add("client: qdrant query_points", timed_calls(
            lambda q: qc.query_points("g", query=q, limit=10, with_payload=True), qlists))
        add("http: /v1/embeddings", await timed_raw(port, embed))
        add("client: openai embeddings.create", timed_calls(
            lambda w: oai.embeddings.create(input=w, model="minilm"), words))
        add("in-process: TextEncoder.encode", timed_calls(lambda w: encoder.encode([w]), words))
    tandem.close()
    qc.close()

    # The same answers through both dialects (a check that the comparison compares like with like).
    same = 0
    for q in qlists[:50]:
        a = [h["id"] for h in (await call(port, "POST", "/collections/g/search", {"vector": q, "k": 10}))[1]["hits"]]
        b = [p["id"] for p in (await call(port, "POST", "/qdrant/collections/g/points/search",
                                          {"vector": q, "limit": 10}))[1]["result"]]
        same += a == b
    p50 = {name: p50_ms(s) for name, s in variants.items()}
    return {
        "corpus": f"{len(vectors)} WordNet glosses, MiniLM 384-d (coarse ivf, defaults)",
        "machine": machine(), "loadavg_at_start": os.getloadavg(),
        "queries": args.queries, "rounds": args.rounds,
        "p50_ms": p50,
        "p90_ms": {name: round(float(np.percentile(s, 90)) * 1000, 3) for name, s in variants.items()},
        "overhead_ms": {
            "qdrant search over tandem search (HTTP)": round(
                p50["http: qdrant search"] - p50["http: tandem search"], 3),
            "qdrant query over tandem search (HTTP)": round(
                p50["http: qdrant query"] - p50["http: tandem search"], 3),
            "/v1/embeddings over in-process encode": round(
                p50["http: /v1/embeddings"] - p50["in-process: TextEncoder.encode"], 3),
        },
        "same_top10_qdrant_vs_native": f"{same} of {len(qlists[:50])} queries",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["p50_ms"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    y = np.arange(len(names))
    ax.barh(y, [result["p50_ms"][n] for n in names], color=["tab:blue" if "embed" not in n and "encode" not in n
                                                            else "tab:orange" for n in names])
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("p50 latency, ms (one request at a time)")
    for i, n in enumerate(names):
        ax.text(result["p50_ms"][n], i, f" {result['p50_ms'][n]:.2f}", va="center")
    ax.set_title(f"dialect overhead, {result['machine']['cpus']} CPUs, {result['corpus']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = run_against_server(lambda port: run(args, port))
    result["args"] = vars(args)
    result["loadavg_at_end"] = os.getloadavg()
    print(json.dumps({k: result[k] for k in ("p50_ms", "overhead_ms", "same_top10_qdrant_vs_native")}, indent=1))
    print("wrote", write_result("compat", result))
    plot(result, RESULTS / "compat.png")


if __name__ == "__main__":
    main()
