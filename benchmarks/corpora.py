"""The real corpora the benchmarks run on, and their embeddings (cached after the first run)."""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / "cache"


def data_dir() -> Path:
    """``$TANDEM_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("TANDEM_DATA", ROOT.parent / "shared" / "data"))


def models_dir() -> Path:
    return Path(os.environ.get("TANDEM_MODELS_DIR", ROOT / "models"))


def gloss_texts() -> list[str]:
    """The 117,659 WordNet glosses as ``(lemmas + " " + definition).strip()``."""
    texts: list[str] = []
    for part in ("corpus-000.jsonl.gz", "corpus-001.jsonl.gz"):
        with gzip.open(data_dir() / "wordnet_glosses" / part, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                texts.append((doc.get("title", "") + " " + doc.get("text", "")).strip())
    return texts


#: WordNet's lexicographer files, by number (``lexfile`` in the glosses' metadata).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


def gloss_metadata() -> list[tuple[str, str]]:
    """``(part of speech, lexicographer file name)`` of each gloss, in ``gloss_texts`` order."""
    out: list[tuple[str, str]] = []
    for part in ("corpus-000.jsonl.gz", "corpus-001.jsonl.gz"):
        with gzip.open(data_dir() / "wordnet_glosses" / part, "rt", encoding="utf-8") as f:
            for line in f:
                meta = json.loads(line).get("metadata", {})
                out.append((meta.get("pos", "?"), LEXNAMES[int(meta.get("lexfile", 0))]))
    return out


def gloss_embeddings() -> np.ndarray:
    """``(117659, 384) float32`` MiniLM embeddings of the glosses, embedded once then cached."""
    return _cached_embeddings("glosses-minilm.npy", gloss_texts)


def npm_texts() -> list[str]:
    """The distinct npm package summaries of 10+ characters (about 179k) from the env library's
    ``packages/npm.tsv`` beside the repository (``$TANDEM_NPM_TSV`` to point elsewhere), in file order."""
    default = ROOT.parent / ".library" / "env" / "packages" / "npm.tsv"
    path = Path(os.environ.get("TANDEM_NPM_TSV", default))
    seen: set[str] = set()
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        next(f)  # header: name, version, downloads_a_month, summary
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4:
                continue
            # Drop the library's own "[tested here: ...]" notes: they are not the authors' text.
            summary = re.sub(r"^\[tested here:[^\]]*\]\s*", "", fields[3]).strip()
            if len(summary) >= 10 and summary not in seen:
                seen.add(summary)
                texts.append(summary)
    return texts


def npm_embeddings() -> np.ndarray:
    """``(n, 384) float32`` MiniLM embeddings of ``npm_texts()``, embedded once then cached."""
    return _cached_embeddings("npm-minilm.npy", npm_texts)


def _cached_embeddings(name: str, texts_of: Callable[[], list[str]]) -> np.ndarray:
    path = CACHE / name
    if path.exists():
        return np.load(path)
    from service.encoder import TextEncoder

    encoder = TextEncoder.load(models_dir() / "minilm")
    texts = texts_of()
    t0 = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=128)
    print(f"embedded {len(texts)} texts for {name} in {time.perf_counter() - t0:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def write_result(name: str, result: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def machine() -> dict[str, object]:
    import platform

    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "processor": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
