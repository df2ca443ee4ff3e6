"""Where faiss runs the coarse stage: the CPU, or GPU 0 when faiss was built with CUDA and sees one.

The choice is process-wide, like faiss's OpenMP thread count: the service makes it once at
start-up, before it opens collections (``use(select("auto"))``), and coarse stages built
afterwards follow it. On a GPU, two scans move there and nothing else changes:

- ``BinaryCoarse``'s scan over all codes (a ``GpuIndexBinaryFlat`` holding a copy of them);
- ``PQCoarse``'s unfiltered IVF-PQ search (a copy made by ``index_cpu_to_gpu``).

The CPU copies stay the source of truth (saving, RAM accounting, filtered searches, inverted
file probes). Nothing here has run on a GPU on the development machine (it has none); the GPU
calls are confined to ``FaissGpu._binary_flat`` and ``FaissGpu._ivf_copy``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

Requested = Literal["auto", "cpu", "gpu"]

#: Largest k (and IVF nprobe) faiss's GPU k-selection takes (GPU_MAX_SELECTION_K); wider
#: searches stay on the CPU.
GPU_MAX_K = 2048


class GpuUnavailable(RuntimeError):
    """A GPU was asked for, but faiss cannot use one; the message says why."""


@dataclass(frozen=True)
class Choice:
    """Where the coarse stage runs, and why (for the start-up log)."""

    device: Literal["cpu", "gpu"]
    reason: str


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 with a CPU-only build (faiss-cpu) or when CUDA sees none."""
    # faiss-cpu has get_num_gpus() too (it returns 0); only GPU builds have StandardGpuResources.
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    return int(faiss.get_num_gpus())


def select(requested: Requested) -> Choice:
    """The device for ``requested``: ``auto`` takes a GPU when faiss sees one, else the CPU.

    Raises ``GpuUnavailable`` for ``gpu`` when faiss cannot use one.
    """
    if requested == "cpu":
        return Choice("cpu", "the CPU was asked for")
    gpus = faiss_gpus()
    if gpus > 0:
        return Choice("gpu", f"faiss sees {gpus} GPU(s); using GPU 0")
    if not hasattr(faiss, "StandardGpuResources"):
        why = "faiss-cpu is installed, which has no GPU support"
    else:
        why = "faiss-gpu sees no GPU"
    if requested == "gpu":
        raise GpuUnavailable(f"the coarse stage cannot run on a GPU: {why}")
    return Choice("cpu", why)


class GpuIndex:
    """A faiss index on the GPU. Calls are serialised by the owner's lock: faiss GPU indexes
    (and the resources they share) must not be called from several threads at once."""

    def __init__(self, index: Any, lock: threading.Lock) -> None:
        self.index = index
        self._lock = lock

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, rows: np.ndarray) -> None:
        """Append ``(n, dim) float32`` vectors, or ``(n, code_size) uint8`` codes for a binary index."""
        with self._lock:
            self.index.add(rows)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Labels of the ``k`` nearest, ``(q, k) int64`` padded with -1."""
        with self._lock:
            _, labels = self.index.search(queries, k)
        return np.asarray(labels, dtype=np.int64)


class FaissGpu:
    """GPU 0's faiss resources; makes the GPU copies of coarse-stage indexes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources = self._make_resources()

    def binary_flat(self, bits: int) -> GpuIndex:
        """An empty flat Hamming index for ``bits``-bit codes."""
        with self._lock:
            index = self._binary_flat(bits)
        return GpuIndex(index, self._lock)

    def ivf_copy(self, index: Any) -> GpuIndex:
        """A GPU copy of a trained CPU IVF index (contents and nprobe)."""
        with self._lock:
            copy = self._ivf_copy(index)
        return GpuIndex(copy, self._lock)

    # The only calls into faiss's GPU API (overridden by CPU stand-ins in tests/test_device.py).
    def _make_resources(self) -> Any:
        return faiss.StandardGpuResources()

    def _binary_flat(self, bits: int) -> Any:
        return faiss.GpuIndexBinaryFlat(self._resources, bits)

    def _ivf_copy(self, index: Any) -> Any:
        options = faiss.GpuClonerOptions()
        # float16 lookup tables: float32 ones for 48 one-byte sub-quantizers (48 x 256 x 4 bytes)
        # fill the 48 KiB of shared memory a GPU block gets by default.
        options.useFloat16 = True
        copy = faiss.index_cpu_to_gpu(self._resources, 0, index, options)
        copy.nprobe = index.nprobe
        return copy


_gpu: FaissGpu | None = None


def use(choice: Choice) -> None:
    """Make ``choice`` the device of coarse stages built from now on."""
    global _gpu
    if choice.device == "cpu":
        _gpu = None
    elif _gpu is None:
        _gpu = FaissGpu()


def gpu() -> FaissGpu | None:
    """The GPU new coarse stages use, or None for the CPU."""
    return _gpu
