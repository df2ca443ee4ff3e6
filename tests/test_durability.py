"""Crash safety with a real SIGKILL, and recovery (or CorruptIndex) when files disagree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from index import Collection, CollectionConfig, errors

DIM = 128
BATCH = 20_000

WRITER = textwrap.dedent(
    f"""
    import sys, numpy as np
    from index import Collection, CollectionConfig
    col = Collection.create(sys.argv[1], CollectionConfig(dim={DIM}))
    for b in range(1000):
        rng = np.random.default_rng(b)
        ids = [f"{{b}}-{{i}}" for i in range({BATCH})]
        print("begin", b, flush=True)
        col.upsert(ids, rng.standard_normal(({BATCH}, {DIM})).astype(np.float32), [{{"b": b}}] * {BATCH})
        print("done", b, flush=True)
    """
)


def batch_vectors(b: int) -> np.ndarray:
    x = np.random.default_rng(b).standard_normal((BATCH, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15])
def test_sigkill_mid_batch_keeps_committed_batches_only(tmp_path, delay):
    path = tmp_path / "c"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    done: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        word, b = line.split()
        if word == "done":
            done.append(int(b))
        elif word == "begin" and int(b) == 2:  # two batches committed, the third in flight
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert done == [0, 1]

    with Collection.open(path) as col:
        n = col.count()
        assert n in (2 * BATCH, 3 * BATCH), "a batch must be all there or not at all"
        for b in range(n // BATCH):
            for i in (0, BATCH // 2, BATCH - 1):
                point = col.get(f"{b}-{i}")
                assert point is not None and point.payload == {"b": b}
                np.testing.assert_allclose(point.vector, batch_vectors(b)[i], atol=1e-6)
        probe = batch_vectors(1)[123]
        assert col.search(probe, 1)[0][0].id == "1-123"
        col.upsert(["after"], probe)  # still writable after recovery
        assert col.count() == n + 1


@pytest.fixture
def closed_collection(tmp_path):
    path = tmp_path / "c"
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    with Collection.create(path, CollectionConfig(dim=16, coarse="binary")) as col:
        col.upsert(list(range(500)), x)
        expected = col.search(x[:5], 5)
    return path, x, expected


def test_truncated_vector_file_raises_corrupt_index(closed_collection):
    path, _, _ = closed_collection
    vectors = next(path.glob("vectors.*"))
    os.truncate(vectors, vectors.stat().st_size - 64 * 10)
    with pytest.raises(errors.CorruptIndex, match="restore the collection from a backup"):
        Collection.open(path)


def test_uncommitted_tail_is_cut_off(closed_collection):
    path, x, expected = closed_collection
    vectors = next(path.glob("vectors.*"))
    size = vectors.stat().st_size
    with open(vectors, "ab") as f:
        f.write(b"\x00" * 64 * 7)  # rows an interrupted batch wrote before its commit
    with Collection.open(path) as col:
        assert col.count() == 500
        assert col.search(x[:5], 5) == expected
    assert vectors.stat().st_size == size


def damage_checkpoint(path: Path, damage: str, rows: int) -> None:
    """Spoil the coarse checkpoint of the closed collection at ``path`` (of ``rows`` rows)."""
    state = path / "coarse.json"
    data_file = next(p for p in path.glob("coarse.*") if p.name != "coarse.json")
    if damage == "garbage":
        data_file.write_bytes(b"not a coarse index")
    elif damage == "missing":
        state.unlink()
    else:  # a checkpoint claiming more rows than the catalog committed
        state.write_text(state.read_text().replace(f'"rows": {rows}', f'"rows": {rows + 400}'))


@pytest.mark.parametrize("damage", ["garbage", "missing", "stale"])
def test_damaged_coarse_checkpoint_is_rebuilt(closed_collection, damage):
    path, x, expected = closed_collection
    damage_checkpoint(path, damage, 500)
    with Collection.open(path) as col:
        assert col.search(x[:5], 5) == expected


def test_catalog_without_config_raises_corrupt_index(closed_collection):
    import sqlite3

    path, _, _ = closed_collection
    db = sqlite3.connect(path / "catalog.sqlite")
    db.execute("DELETE FROM meta WHERE key = 'config'")
    db.commit()
    db.close()
    with pytest.raises(errors.CorruptIndex, match="no config"):
        Collection.open(path)
