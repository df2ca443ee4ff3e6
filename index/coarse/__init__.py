"""The coarse stage, held in RAM: compact codes that pick candidates for the exact rerank.

One kind, one module, behind the ``CoarseStage`` protocol (``base.py``):

- ``ivf``: an inverted file of 4-bit PQ codes scanned by faiss's FastScan kernel
  (``IVFCoarse``); its cost grows as sqrt(rows). The default for single vectors.
- ``binary``: sign bits scanned whole by Hamming distance, rescored asymmetrically
  (``BinaryCoarse``). The default for multi-vector FDEs.
- ``pq``: faiss IVF-PQ with 8-bit sub-quantizers (``PQCoarse``).
- ``flat``: no coarse stage; the collection scans its vectors exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from index.coarse.base import Checkpoint, Chunks, CoarseStage, Scan, atomic_write
from index.coarse.binary import BinaryCoarse
from index.coarse.ivf import IVFCoarse
from index.coarse.pq import PQCoarse
from index.config import CollectionConfig

__all__ = [
    "BinaryCoarse", "Checkpoint", "Chunks", "CoarseStage", "IVFCoarse", "PQCoarse", "Scan", "make_coarse", "save_state",
]


def make_coarse(config: CollectionConfig, dim: int) -> CoarseStage | None:
    """An empty stage of the collection's kind, for vectors of ``dim`` (None for ``flat``)."""
    if config.coarse == "ivf":
        return IVFCoarse(dim, bits=config.bits, nprobe=config.nprobe)
    if config.coarse == "binary":
        return BinaryCoarse(dim, config.effective_binary_transform)
    if config.coarse == "pq":
        return PQCoarse(dim, probe_fraction=config.probe_fraction)
    return None


def save_state(directory: Path, state: dict[str, Any]) -> None:
    atomic_write(directory / "coarse.json", lambda name: Path(name).write_text(json.dumps(state)))
