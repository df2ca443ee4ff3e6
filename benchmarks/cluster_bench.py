"""Cluster mode against a single node, on this one machine.

For a single node (`tandem serve`) and for `tandem cluster` at several shard and copy counts,
each on its own local Ray cluster: the glosses (116,659 MiniLM vectors, held-out queries) are
loaded through HTTP, then
- time to ready, and the memory of the whole process tree (the server, and for the cluster
  Ray's GCS, raylet, dashboard, Serve's controller and proxy, the router and each shard copy):
  the sum of their RSS, which counts shared pages once per process;
- single-client latency of 1,000 vector searches (k = 10, default settings): p50 / p99;
- throughput of 4 concurrent clients for 15 s;
- recall@10 of the approximate searches against exact search.

What a 2-core machine can show: the per-query cost of the cluster path (the router's fan-out
and merge, Ray's handle calls) and Ray's own memory and start-up. What it cannot: throughput
growing with shards or copies, since every copy shares the same 2 cores (more shards here only
adds work); that needs as many machines.

    python -m benchmarks.cluster_bench   # results/cluster.json, results/cluster.png
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.corpora import RESULTS, ROOT, machine, models_dir, write_result
from benchmarks.index_bench import corpus, exact_top

CONFIGS: list[tuple[str, list[str]]] = [
    ("single node", []),
    ("cluster 1 shard x 1 copy", ["--shards", "1", "--replicas", "1"]),
    ("cluster 2 shards x 1 copy", ["--shards", "2", "--replicas", "1"]),
    ("cluster 2 shards x 2 copies", ["--shards", "2", "--replicas", "2"]),
]


def _b64(v: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process descending from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def measure(name: str, flags: list[str], base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            workdir: Path) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = "serve" if not flags else "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")} | {"RAY_DISABLE_USAGE_STATS": "1"}
    data = workdir / name.replace(" ", "-")
    cmd = [sys.executable, "-m", "service.cli", command, "--host", "127.0.0.1", "--port", str(port), "--data-dir",
           str(data), "--models-dir", str(models_dir()), "--no-access-log", "--recall-sample-rate", "0", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / f"{data.name}.log", "wb"), start_new_session=True)  # noqa: SIM115
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise RuntimeError(f"{name} did not start: see {workdir / f'{data.name}.log'}")
            time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        idle_mb = _rss_mb(_tree(proc.pid))
        assert client.put("/collections/g", json={"dim": int(base.shape[1])}).status_code == 201
        t1 = time.perf_counter()
        for start in range(0, len(base), 1000):
            points = [{"id": i, "vector": _b64(base[i])} for i in range(start, min(start + 1000, len(base)))]
            r = client.put("/collections/g/points", json={"points": points})
            assert r.status_code == 200, r.text
        load_s = time.perf_counter() - t1
        time.sleep(15)  # background training of the coarse stages
        bodies = [json.dumps({"vector": _b64(q), "k": 10, "with_payload": False}) for q in queries]
        headers = {"content-type": "application/json"}
        times, found = [], []
        for body in bodies:
            t = time.perf_counter()
            r = client.post("/collections/g/search", content=body, headers=headers)
            times.append(time.perf_counter() - t)
            found.append([h["id"] for h in r.json()["hits"]])
        recall = float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))
        done = [0]
        stop = time.perf_counter() + 15

        def load() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                i = 0
                while time.perf_counter() < stop:
                    c.post("/collections/g/search", content=bodies[i % len(bodies)], headers=headers)
                    done[0] += 1
                    i += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        t2 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        qps = done[0] / (time.perf_counter() - t2)
        ms = np.array(times) * 1000
        out = {
            "ready_s": round(ready_s, 1), "load_points_per_s": round(len(base) / load_s),
            "rss_mb_idle": round(idle_mb), "rss_mb_loaded": round(_rss_mb(_tree(proc.pid))),
            "processes": len(_tree(proc.pid)),
            "p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "qps_4_clients": round(qps, 1), "recall_at_10": round(recall, 4),
        }
        print(name, out, flush=True)
        return out
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        ray_cli = Path(sys.executable).parent / "ray"
        if flags and ray_cli.exists():  # a local cluster's leftovers, if SIGINT left any
            subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, check=False)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    runs = [result["configs"][n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["p50_ms"] for r in runs], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["p99_ms"] for r in runs], 0.4, label="p99")
    axes[0].set_ylabel("ms, one client, vector search k=10")
    axes[0].legend()
    axes[1].bar(x, [r["qps_4_clients"] for r in runs])
    axes[1].set_ylabel("searches/s, 4 clients")
    axes[2].bar(x, [r["rss_mb_loaded"] for r in runs])
    axes[2].set_ylabel("MB, sum of RSS of the process tree")
    for ax in axes:
        ax.set_xticks(x, [n.replace("cluster ", "").replace(" x ", "x\n") for n in names], fontsize=8)
    fig.suptitle(f"cluster mode on one {result['machine']['cpus']}-core machine: 116,659 glosses")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    base, queries = corpus("glosses")
    queries = queries[: args.queries]
    truth = exact_top(base, queries, 10)
    result: dict[str, Any] = {"machine": machine(), "loadavg_at_start": os.getloadavg(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="tandem-cluster-") as tmp:
        for name, flags in CONFIGS:
            result["configs"][name] = measure(name, flags, base, queries, truth, Path(tmp))
    path = write_result("cluster", result)
    plot(result, RESULTS / "cluster.png")
    print("wrote", path)


if __name__ == "__main__":
    main()
