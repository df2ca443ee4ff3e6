"""Cluster mode against a single node, on this one machine.

For a single node (`tandem serve`) and for `tandem cluster` at several shard and copy counts,
each on its own local Ray cluster: the glosses (116,659 MiniLM vectors, held-out queries) are
loaded through HTTP, then
- time to ready, and the memory of the whole process tree (the server, and for the cluster
  Ray's GCS, raylet, dashboard, Serve's controller and proxy, the router and each shard copy):
  the sum of their RSS, which counts shared pages once per process;
- single-client latency of 1,000 vector searches (k = 10, default settings): p50 / p99;
- throughput of 4 concurrent clients for 15 s;
- recall@10 of the approximate searches against exact search;
- bulk ingestion of 4,000 gloss texts from an NDJSON file (``POST .../ingest/files``: the
  single node's job, the cluster's Ray Data job with its encoder actor pool), then the latency
  of 300 text searches (the cluster encodes on its encoder deployment).
And once, what one call costs on this machine's Ray: a plain actor method call against a Serve
deployment handle call (the router calls each shard copy through one).

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

from benchmarks.corpora import RESULTS, ROOT, gloss_texts, machine, models_dir, write_result
from benchmarks.index_bench import corpus, exact_top

CONFIGS: list[tuple[str, list[str]]] = [
    ("single node", []),
    ("cluster 1 shard x 1 copy", ["--shards", "1", "--replicas", "1"]),
    ("cluster 1 x 1, routers encode", ["--shards", "1", "--replicas", "1", "--encoder-max-replicas", "0"]),
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


INGEST_TEXTS = 4_000
TEXT_QUERIES = 300


def _latency(client: httpx.Client, path: str, bodies: list[str]) -> tuple[float, float]:
    headers = {"content-type": "application/json"}
    times = []
    for body in bodies:
        t = time.perf_counter()
        r = client.post(path, content=body, headers=headers)
        times.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    ms = np.array(times) * 1000
    return round(float(np.median(ms)), 3), round(float(np.percentile(ms, 99)), 3)


def measure(name: str, flags: list[str], base: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            workdir: Path, texts: list[str]) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = "serve" if not flags else "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")} | {"RAY_DISABLE_USAGE_STATS": "1"}
    data = workdir / name.replace(" ", "-")
    cmd = [sys.executable, "-m", "service.cli", command, "--host", "127.0.0.1", "--port", str(port), "--data-dir",
           str(data), "--models-dir", str(models_dir()), "--no-access-log", "--recall-sample-rate", "0",
           "--import-dir", str(workdir), *flags]
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
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        qps = done[0] / (time.perf_counter() - t2)
        ms = np.array(times) * 1000
        # Bulk ingestion of texts from a file, then text searches.
        assert client.put("/collections/t", json={"encoder": "minilm"}).status_code == 201
        t3 = time.perf_counter()
        r = client.post("/collections/t/ingest/files", json={"paths": ["texts.ndjson"]})
        assert r.status_code == 202, r.text
        while (job := client.get(f"/jobs/{r.json()['job_id']}").json())["state"] == "running":
            time.sleep(0.2)
        ingest_s = time.perf_counter() - t3
        assert job["state"] == "completed" and job["points_committed"] == INGEST_TEXTS, job
        text_bodies = [json.dumps({"text": q, "k": 10, "with_payload": False})
                       for q in texts[INGEST_TEXTS:INGEST_TEXTS + TEXT_QUERIES]]
        text_p50, text_p99 = _latency(client, "/collections/t/search", text_bodies)
        out = {
            "ready_s": round(ready_s, 1), "load_points_per_s": round(len(base) / load_s),
            "rss_mb_idle": round(idle_mb), "rss_mb_loaded": round(_rss_mb(_tree(proc.pid))),
            "processes": len(_tree(proc.pid)),
            "p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "qps_4_clients": round(qps, 1), "recall_at_10": round(recall, 4),
            "ingest_texts_per_s": round(INGEST_TEXTS / ingest_s, 1), "ingest_s": round(ingest_s, 1),
            "text_p50_ms": text_p50, "text_p99_ms": text_p99,
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


CALL_COSTS = """
import json, time, numpy as np, ray
from ray import serve
ray.init(include_dashboard=False, log_to_driver=False)

@ray.remote(num_cpus=0)
class Plain:
    def ping(self, x):
        return x

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Deployed:
    def ping(self, x):
        return x

handle = serve.run(Deployed.bind(), name="calls", route_prefix=None)
actor = Plain.remote()
payload = np.zeros(384, dtype=np.float32)
def timed(call):
    for _ in range(30):
        call()
    times = []
    for _ in range(500):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}
print(json.dumps({"plain_actor_call": timed(lambda: ray.get(actor.ping.remote(payload))),
                  "serve_handle_call": timed(lambda: handle.ping.remote(payload).result())}))
"""


def call_costs() -> dict[str, Any]:
    """A plain Ray actor call against a Serve handle call, each 500 times, in a fresh local Ray."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", CALL_COSTS], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    ray_cli = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, check=False)
    costs: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print("ray call costs", costs, flush=True)
    return costs


def _label(name: str) -> str:
    """'cluster 2 shards x 2 copies' -> '2 x 2'; 'cluster 1 x 1, routers encode' -> '1 x 1\nrouters encode'."""
    short = name.replace("cluster ", "").replace(" shards", "").replace(" shard", "")
    return short.replace(" copies", "").replace(" copy", "").replace(", ", "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    runs = [result["configs"][n] for n in names]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["p50_ms"] for r in runs], 0.4, label="p50")
    axes[0].bar(x + 0.2, [r["p99_ms"] for r in runs], 0.4, label="p99")
    axes[0].set_ylabel("ms, one client, vector search k=10")
    axes[0].legend()
    axes[1].bar(x, [r["qps_4_clients"] for r in runs])
    axes[1].set_ylabel("searches/s, 4 clients")
    axes[2].bar(x, [r["rss_mb_loaded"] for r in runs])
    axes[2].set_ylabel("MB, sum of RSS of the process tree")
    axes[3].bar(x - 0.2, [r["text_p50_ms"] for r in runs], 0.4, label="text search p50 (ms)")
    axes[3].bar(x + 0.2, [r["ingest_texts_per_s"] / 10 for r in runs], 0.4, label="file ingestion texts/s / 10")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [_label(n) for n in names], fontsize=8)
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
    texts = gloss_texts()
    result: dict[str, Any] = {"machine": machine(), "loadavg_at_start": os.getloadavg(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="tandem-cluster-") as tmp:
        lines = [json.dumps({"id": i, "text": texts[i]}) for i in range(INGEST_TEXTS)]
        (Path(tmp) / "texts.ndjson").write_text("\n".join(lines) + "\n")
        for name, flags in CONFIGS:
            result["configs"][name] = measure(name, flags, base, queries, truth, Path(tmp), texts)
    result["ray_call_costs"] = call_costs()
    path = write_result("cluster", result)
    plot(result, RESULTS / "cluster.png")
    print("wrote", path)


if __name__ == "__main__":
    main()
