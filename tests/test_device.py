"""Device selection (``--device auto|cpu|gpu``): the CPU fallback, the GPU error, and the coarse
stage's GPU wiring.

This machine has no GPU and faiss-cpu, so: ``auto`` must fall back to the CPU and say why,
``gpu`` must stop start-up with a message that names the fix, and the CPU path must give the
results it gave before the GPU path existed. The GPU copies' bookkeeping (kept in step through
add, rebuild and load; used only where faiss's GPU indexes can serve) is checked with a CPU
stand-in for faiss's GPU index classes: the one part not run here is faiss's GPU code itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from pydantic import ValidationError

from index import device
from index.coarse import BinaryCoarse, PQCoarse
from index.coarse.base import top as _top
from index.coarse.binary import bit_products as _bit_products
from index.row_sets import Allowed
from service.settings import Settings
from tests.server import REPO_ROOT, Server
from tests.synthetic import embeddings, queries_near


class _Counting:
    """Wraps a CPU faiss index, counting searches: tells which path a search took."""

    def __init__(self, index: Any) -> None:
        self.index = index
        self.searches = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, rows: np.ndarray) -> None:
        self.index.add(rows)

    def search(self, queries: np.ndarray, k: int) -> Any:
        self.searches += 1
        return self.index.search(queries, k)


class CpuStandIn(device.FaissGpu):
    """``FaissGpu`` with CPU faiss in place of the GPU classes (same Python API)."""

    def _make_resources(self) -> Any:
        return None

    def _binary_flat(self, bits: int) -> Any:
        return _Counting(faiss.IndexBinaryFlat(bits))

    def _ivf_copy(self, index: Any) -> Any:
        return _Counting(faiss.clone_index(index))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> CpuStandIn:
    gpu = CpuStandIn()
    monkeypatch.setattr(device, "_gpu", gpu)
    return gpu


@pytest.fixture(autouse=True)
def _cpu_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "_gpu", None)  # restored after each test


def _hamming(codes: np.ndarray, qcode: np.ndarray) -> np.ndarray:
    return np.unpackbits(codes ^ qcode, axis=1).sum(axis=1)


# -- selection ----------------------------------------------------------------------------------


def test_auto_falls_back_to_cpu_and_says_why() -> None:
    assert device.faiss_gpus() == 0
    choice = device.select("auto")
    assert choice.device == "cpu"
    assert choice.reason == "faiss-cpu is installed, which has no GPU support"
    assert device.select("cpu") == device.Choice("cpu", "the CPU was asked for")
    device.use(choice)
    assert device.gpu() is None


def test_gpu_without_one_is_refused() -> None:
    with pytest.raises(device.GpuUnavailable, match="cannot run on a GPU: faiss-cpu is installed"):
        device.select("gpu")
    with pytest.raises(ValidationError) as info:
        Settings(device="gpu")
    message = str(info.value)
    assert "cannot run on a GPU" in message and "TANDEM_DEVICE=auto (--device auto)" in message
    assert Settings(device="auto").device == "auto"
    with pytest.raises(ValidationError):
        Settings(device="tpu")  # type: ignore[arg-type]  # the point of the check


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_with_device_gpu_stops_at_start_up(tmp_path: Path, how: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    args = ["--device", "gpu"] if how == "flag" else []
    if how == "env":
        env["TANDEM_DEVICE"] = "gpu"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--data-dir", str(tmp_path / "data"), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "tandem serve: device:" in proc.stderr
    assert "set TANDEM_DEVICE=auto (--device auto) to fall back to the CPU" in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


@pytest.mark.slow
def test_server_logs_where_encoder_and_coarse_stage_run(tmp_path: Path, models_dir: Path) -> None:
    srv = Server(tmp_path / "data", models_dir, "--device", "auto").start()
    try:
        with srv.client() as c:
            assert c.put("/collections/d", json={"encoder": "minilm"}).status_code == 201
            put = c.put("/collections/d/points?wait=true", json={"points": [{"id": 1, "text": "on the cpu"}]})
            assert put.status_code == 200, put.text
            hits = c.post("/collections/d/search", json={"text": "cpu", "k": 1}).json()["hits"]
            assert [h["id"] for h in hits] == [1]
    finally:
        srv.stop_cleanly()
    lines = [line for line in srv.log().splitlines() if "coarse stage on" in line]
    assert len(lines) == 1, srv.log()[-3000:]
    assert "device auto: encoder on CPUExecutionProvider (onnxruntime-gpu is not installed)" in lines[0]
    assert "coarse stage on cpu (faiss-cpu is installed, which has no GPU support)" in lines[0]


# -- the CPU path, unchanged ------------------------------------------------------------------


def _reference_candidates(coarse: BinaryCoarse, queries: np.ndarray, n: int, shortlist: int) -> np.ndarray:
    """BinaryCoarse.candidates as it was before the GPU path (unfiltered, flat scan)."""
    projected, qcodes, width = coarse._project(queries), coarse.encode(queries), max(n, shortlist)
    out = np.full((len(queries), n), -1, dtype=np.int64)
    for i in range(len(queries)):
        variant = "mc" if width > 256 else "hc"
        _, found = faiss.knn_hamming(qcodes[i : i + 1], coarse.codes, min(width, coarse.rows), variant=variant)
        rows = found[0][found[0] >= 0]
        if width > n and len(rows) > n:
            rows = rows[_top(_bit_products(projected[i], coarse.codes[rows]), n)]
        out[i, : len(rows)] = rows[:n]
    return out


@pytest.mark.parametrize("shortlist", [40, 400])
def test_cpu_binary_candidates_unchanged(shortlist: int) -> None:
    device.use(device.select("auto"))
    base = embeddings(3000, 64, seed=1)
    queries = queries_near(base, 20, seed=2)
    coarse = BinaryCoarse(64, "center")
    coarse.add(base[:2000])
    coarse.add(base[2000:])
    assert coarse._gpu_codes is None
    got = coarse.candidates(queries, 30, shortlist=shortlist, allowed=None)
    np.testing.assert_array_equal(got, _reference_candidates(coarse, queries, 30, shortlist))


# -- the GPU wiring, with a CPU stand-in ------------------------------------------------------


def test_binary_gpu_copy_follows_the_codes(stand_in: CpuStandIn, tmp_path: Path) -> None:
    base = embeddings(3000, 64, seed=3)
    queries = queries_near(base, 10, seed=4)
    coarse = BinaryCoarse(64, "center")
    coarse.add(base[:1000])
    coarse.add(base[1000:])
    copy = coarse._gpu_codes
    assert copy is not None and copy.ntotal == coarse.rows == 3000

    def check(c: BinaryCoarse, allowed: np.ndarray | None) -> None:
        qcodes = c.encode(queries)
        for i in range(len(queries)):
            rows = c._shortlist(qcodes[i : i + 1], 100, allowed)
            assert len(rows) == 100
            ok = allowed if allowed is not None else np.ones(c.rows, dtype=bool)
            assert ok[rows].all()
            # Same Hamming distances as an exact scan of the allowed codes (ties may order differently).
            exact = np.sort(_hamming(c.codes[ok], qcodes[i]))[:100]
            np.testing.assert_array_equal(np.sort(_hamming(c.codes[rows], qcodes[i])), exact)

    check(coarse, None)
    searches = copy.index.searches
    assert searches == len(queries)
    allowed = np.ones(3000, dtype=bool)
    allowed[::50] = False  # a few tombstones: the whole scan, a little wider
    check(coarse, allowed)
    assert copy.index.searches == searches + len(queries)

    coarse = coarse.rebuilt(lambda: iter([(0, base)]), len(base))  # a fresh copy of the re-encoded codes
    assert coarse._gpu_codes is not copy and coarse._gpu_codes is not None
    assert coarse._gpu_codes.ntotal == 3000
    check(coarse, None)

    state = coarse.checkpoint()(tmp_path, "t")
    loaded = BinaryCoarse(64, "center")
    loaded.load(tmp_path, state)
    assert loaded._gpu_codes is not None and loaded._gpu_codes.ntotal == 3000
    check(loaded, None)
    # Wider than faiss's GPU k-selection: the CPU scan answers.
    before = loaded._gpu_codes.index.searches
    loaded._shortlist(loaded.encode(queries[:1]), device.GPU_MAX_K + 1, None)
    assert loaded._gpu_codes.index.searches == before


def test_pq_gpu_copy_serves_unfiltered_searches(stand_in: CpuStandIn, tmp_path: Path) -> None:
    base = embeddings(PQCoarse.TRAIN_ROWS + 500, 64, seed=5)
    queries = queries_near(base, 10, seed=6)
    coarse = PQCoarse(64)
    coarse.add(base)
    coarse = coarse.rebuilt(lambda: iter([(0, base[:-500]), (len(base) - 500, base[-500:])]), len(base))
    copy = coarse._gpu_index
    assert copy is not None and copy.ntotal == coarse.rows == len(base)
    more = embeddings(200, 64, seed=7)
    coarse.add(more)
    assert copy.ntotal == coarse.rows == len(base) + 200

    got = coarse.candidates(queries, 50, shortlist=50, allowed=None)
    assert copy.index.searches == 1
    _, expected = coarse.index.search(queries, 50)
    np.testing.assert_array_equal(got, expected)

    allowed = np.zeros(coarse.rows, dtype=bool)
    allowed[::3] = True
    filtered = coarse.candidates(queries, 50, shortlist=50, allowed=Allowed.of_mask(allowed, int(allowed.sum())))
    assert copy.index.searches == 1  # a filter stays on the CPU
    assert allowed[filtered[filtered >= 0]].all()

    state = coarse.checkpoint()(tmp_path, "t")
    loaded = PQCoarse(64)
    loaded.load(tmp_path, state)
    assert loaded._gpu_index is not None and loaded._gpu_index.ntotal == coarse.rows
    np.testing.assert_array_equal(loaded.candidates(queries, 50, shortlist=50, allowed=None), got)
