"""Encoder throughput and latency: our ONNX encoder against the same model through torch.

    python -m benchmarks.encoder_bench [--threads 1 2] [--runs 300] [--gloss-docs 2000]

Measures, for each intra-op thread count:
- one-query latency (p50/p99 over --runs calls after a warm-up), SciFact queries in turn;
- documents per second on SciFact abstracts and on WordNet glosses (sorted by length,
  batches of --batch-size), for onnxruntime and for torch (torch.set_num_threads).
Writes benchmarks/results/encoder.json and encoder.png. Data is read from TANDEM_DATA or
--data (default: ../shared/data relative to the repository root).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _read_jsonl_gz(paths: Sequence[Path], limit: int) -> list[str]:
    texts: list[str] = []
    for path in paths:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                texts.append((rec.get("title", "") + " " + rec.get("text", "")).strip())
                if len(texts) >= limit:
                    return texts
    return texts


def load_texts(data: Path, *, scifact_docs: int, gloss_docs: int) -> dict[str, list[str]]:
    scifact = data / "scifact"
    queries = [json.loads(line)["text"] for line in (scifact / "queries.jsonl").open()]
    glosses = data / "wordnet_glosses"
    return {
        "queries": queries,
        "scifact": _read_jsonl_gz([scifact / "corpus.jsonl.gz"], scifact_docs),
        "glosses": _read_jsonl_gz(
            [glosses / "corpus-000.jsonl.gz", glosses / "corpus-001.jsonl.gz"], gloss_docs
        ),
    }


def latency_ms(
    fn: Callable[[str], Any], queries: Sequence[str], runs: int, warmup: int = 30
) -> dict[str, float]:
    for q in islice(_cycle(queries), warmup):
        fn(q)
    times = []
    for q in islice(_cycle(queries), runs):
        t0 = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "runs": runs,
    }


def docs_per_s(fn: Callable[[list[str]], Any], texts: list[str]) -> dict[str, float]:
    fn(texts[:32])  # warm-up: first allocations, kernel selection
    t0 = time.perf_counter()
    fn(texts)
    elapsed = time.perf_counter() - t0
    return {
        "docs": len(texts),
        "seconds": round(elapsed, 3),
        "docs_per_s": round(len(texts) / elapsed, 1),
    }


def _cycle(items: Sequence[str]) -> Any:
    while True:
        yield from items


class TorchEncoder:
    """The same model through torch + transformers, pooled as sentence-transformers does."""

    def __init__(self, max_length: int = 256) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        from service.model_export import packaged_model_dir

        path = packaged_model_dir()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        torch = self.torch
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths)[::-1]
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tok([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from service.encoder import TextEncoder

    texts = load_texts(args.data, scifact_docs=args.scifact_docs, gloss_docs=args.gloss_docs)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine()},
        "model": args.model_dir.name,  # a name, not this machine's path
        "batch_size": args.batch_size,
        "onnxruntime": {},
        "onnxruntime-int8": {},
        "torch": {},
    }
    int8 = (args.model_dir / "model.int8.onnx").is_file() and not args.no_int8
    torch_enc = None if args.no_torch else TorchEncoder()
    for threads in args.threads:
        for backend, quantized in (("onnxruntime", False), ("onnxruntime-int8", True)):
            if quantized and not int8:
                continue
            enc = TextEncoder.load(args.model_dir, threads=threads, quantized=quantized)
            row: dict[str, Any] = {"provider": enc.provider}
            row["one_query"] = latency_ms(lambda q, enc=enc: enc.encode([q]), texts["queries"], args.runs)
            for name in ("scifact", "glosses"):
                row[name] = docs_per_s(
                    lambda t, enc=enc: enc.encode(t, batch_size=args.batch_size), texts[name]
                )
            results[backend][str(threads)] = row
            print(f"{backend} threads={threads}: {json.dumps(row)}", file=sys.stderr)
            del enc
        if torch_enc is not None:
            torch_enc.torch.set_num_threads(threads)
            trow: dict[str, Any] = {}
            trow["one_query"] = latency_ms(lambda q: torch_enc.encode([q]), texts["queries"],
                                           max(50, args.runs // 4))
            for name in ("scifact", "glosses"):
                trow[name] = docs_per_s(lambda t: torch_enc.encode(t, args.batch_size), texts[name])
            results["torch"][str(threads)] = trow
            print(f"torch threads={threads}: {json.dumps(trow)}", file=sys.stderr)
    if torch_enc is not None:
        results["speedup_docs_per_s"] = {
            t: {name: round(results["onnxruntime"][t][name]["docs_per_s"]
                            / results["torch"][t][name]["docs_per_s"], 2)
                for name in ("scifact", "glosses")}
            for t in results["onnxruntime"]
        }
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = list(results["onnxruntime"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    backends = [b for b in ("onnxruntime", "onnxruntime-int8", "torch") if results[b]]
    width = 0.8 / len(backends)
    x = np.arange(len(threads))
    for ax, metric, title in (
        (axes[0], ("one_query", "p50_ms"), "one query, p50 latency (ms, lower is better)"),
        (axes[1], ("scifact", "docs_per_s"), "SciFact abstracts (docs/s)"),
        (axes[2], ("glosses", "docs_per_s"), "WordNet glosses (docs/s)"),
    ):
        for i, backend in enumerate(backends):
            offset = (i - (len(backends) - 1) / 2) * width
            vals = [results[backend][t][metric[0]][metric[1]] for t in threads]
            bars = ax.bar(x + offset, vals, width, label=backend)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
        ax.set_xticks(x, [f"{t} thread{'s' if t != '1' else ''}" for t in threads])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", ncols=len(backends))
    fig.suptitle("all-MiniLM-L6-v2 encoder: onnxruntime (float32, int8) vs torch, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encoder_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path,
                   default=Path(os.environ.get("TANDEM_DATA", REPO.parent / "shared" / "data")),
                   help="shared data folder (env TANDEM_DATA; default ../shared/data)")
    p.add_argument("--model-dir", type=Path,
                   default=Path(os.environ.get("TANDEM_MODELS_DIR", REPO / "models")) / "minilm",
                   help="exported model folder (default models/minilm)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=int, default=300, help="one-query calls timed per setting")
    p.add_argument("--scifact-docs", type=int, default=500)
    p.add_argument("--gloss-docs", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    p.add_argument("--no-int8", action="store_true", help="skip model.int8.onnx even if present")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not (args.model_dir / "model.onnx").is_file():
        raise SystemExit(f"{args.model_dir}/model.onnx not found: run "
                         f"`tandem export-model --models-dir {args.model_dir.parent}` first")
    if not (args.data / "scifact").is_dir():
        raise SystemExit(f"{args.data}/scifact not found: pass --data or set TANDEM_DATA")
    load_before = os.getloadavg()
    results = run(args)
    # Timings on a shared machine mean little without the load they were taken under.
    results["machine"]["loadavg_1m_before_after"] = [round(load_before[0], 2),
                                                     round(os.getloadavg()[0], 2)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "encoder.png")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
