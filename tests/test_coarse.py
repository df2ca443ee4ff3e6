"""The coarse stages at sizes where their inverted files are active: recall against brute force,
searches and writes during a background rebuild, a kill in the middle of one, reopening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from index import Collection, CollectionConfig
from index.coarse import IVFCoarse
from tests.synthetic import brute_force, embeddings, queries_near, recall_at_k
from tests.test_durability import damage_checkpoint

DIM = 64
N = 12_000
TRAIN = 2_000  # IVFCoarse.TRAIN_ROWS for these tests: the inverted file is trained at 2k rows


@pytest.fixture(autouse=True)
def small_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(IVFCoarse, "TRAIN_ROWS", TRAIN)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    base = embeddings(N, DIM, clusters=200, seed=11)
    return base, queries_near(base, 200, seed=12)


def fill(path: Path, config: CollectionConfig, base: np.ndarray, *, batch: int = 1000, wait: bool = True) -> Collection:
    col = Collection.create(path, config)
    for start in range(0, len(base), batch):
        ids = list(range(start, min(start + batch, len(base))))
        col.upsert(ids, base[start : start + batch], [{"n": i, "odd": i % 2} for i in ids])
        if wait:  # each rebuild swapped in before the next batch: the same stage every run
            col.rebuilds.wait()
    return col


def ids(hits: list[list[object]]) -> list[list[object]]:
    return [[h.id for h in r] for r in hits]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("bits", "nprobe", "floor"), [(1, 16, 0.93), (1, 40, 0.98), (2, 16, 0.93), (4, 16, 0.93)])
def test_ivf_recall_against_numpy(tmp_path, data, bits, nprobe, floor):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM, bits=bits, nprobe=nprobe), base) as col:
        stage = col._coarse  # noqa: SLF001 - the mode under test
        assert isinstance(stage, IVFCoarse) and stage.ready
        assert stage.nprobe < stage.nlist  # only part of the lists is scanned
        truth = brute_force(base, queries, 10).tolist()
        found = ids(col.search(queries, 10))
        assert recall_at_k(truth, found, 10) >= floor


def test_ivf_codes_improve_with_bits(tmp_path, data):
    base, queries = data
    truth = brute_force(base, queries, 10).tolist()
    raw = []
    for bits in (1, 2, 4):
        with fill(tmp_path / f"c{bits}", CollectionConfig(dim=DIM, bits=bits, nprobe=64), base) as col:
            cand = col._coarse.candidates(queries, 10, shortlist=10, allowed=None)  # noqa: SLF001
            raw.append(recall_at_k(truth, cand.tolist(), 10))
            assert col.stats().ram_bytes / col.count() < {1: 64, 2: 80, 4: 112}[bits]  # DIM * bits / 8 + 8 + lists
    assert raw[0] < raw[1] < raw[2]


def test_small_collections_are_searched_exactly(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM), base[: TRAIN - 1]) as col:
        assert not col._coarse.ready  # noqa: SLF001
        result = col.search_detailed(queries, 10)
        assert result.candidates == TRAIN - 1
        assert ids(result.hits) == brute_force(base[: TRAIN - 1], queries, 10).tolist()


def test_deletes_and_filters_are_applied_in_the_lists(tmp_path, data):
    base, queries = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM), base) as col:
        first = ids(col.search(queries[:20], 10))
        gone = sorted({r[0] for r in first})
        col.delete(gone)
        after = ids(col.search(queries[:20], 10))
        assert not set(gone) & {i for r in after for i in r}
        assert all(len(r) == 10 for r in after)
        odd = col.search(queries[:20], 10, filter={"must": [{"key": "odd", "match": 1}]})
        assert all(len(r) == 10 and all(h.id % 2 == 1 for h in r) for r in odd)


def test_reopened_collection_gives_identical_results(tmp_path, data):
    base, queries = data
    path = tmp_path / "c"
    with fill(path, CollectionConfig(dim=DIM), base) as col:
        before = col.search(queries, 10)
        nlist = col._coarse.nlist  # noqa: SLF001
    with Collection.open(path) as col:
        assert col._coarse.nlist == nlist  # noqa: SLF001 - loaded, not retrained
        assert not col.rebuilds.running
        assert col.search(queries, 10) == before


def test_growth_rebuilds_in_background_with_more_lists(tmp_path, data):
    base, _ = data
    with fill(tmp_path / "c", CollectionConfig(dim=DIM), base) as col:
        stage = col._coarse  # noqa: SLF001
        # Trained at 2k, retrained at 4k and 8k (each doubling): lists follow sqrt(rows).
        assert col.rebuilds.completed == 3
        assert stage.trained_rows == 8_000 and stage.nlist == IVFCoarse.lists_for(8_000)


def test_searches_and_writes_during_a_rebuild(tmp_path, data):
    """Hold the rebuild before its swap (it waits for the checkpoint lock, which the test holds):
    searches keep answering from the old stage, writes keep landing, and the new stage catches
    up with them when it is swapped in."""
    base, queries = data
    col = fill(tmp_path / "c", CollectionConfig(dim=DIM), base[:7_000])
    truth_old = brute_force(base[:7_000], queries, 10).tolist()
    lock = col._checkpoint_lock  # noqa: SLF001
    lock.acquire()
    try:
        col.upsert(list(range(7_000, 8_000)), base[7_000:8_000])  # 8k rows: 2x the trained 4k
        assert col.rebuilds.running
        old_stage = col._coarse  # noqa: SLF001
        during = ids(col.search(queries, 10))
        assert recall_at_k(brute_force(base[:8_000], queries, 10).tolist(), during, 10) >= 0.95
        col.upsert(list(range(8_000, N)), base[8_000:])  # more rows while the rebuild waits
        col.delete([0, 1, 2])
        assert col._coarse is old_stage  # noqa: SLF001 - not swapped yet
        assert col.rebuilds.running
    finally:
        lock.release()
    col.rebuilds.wait()
    assert col._coarse is not old_stage and col._coarse.rows == N  # noqa: SLF001
    live = np.arange(3, N)
    truth = [live[r].tolist() for r in brute_force(base[3:], queries, 10)]
    assert recall_at_k(truth, ids(col.search(queries, 10)), 10) >= 0.95
    # Every point written during the rebuild is found by its own vector.
    own = [r[0] for r in ids(col.search(base[8_000:N:97], 10))]
    assert own == list(range(8_000, N, 97))
    assert truth_old  # the old truth was computed before the writes
    col.close()


def test_many_small_upserts_do_not_copy_the_live_mask_each_time(tmp_path):
    x = embeddings(3000, DIM, seed=5)
    with Collection.create(tmp_path / "c", CollectionConfig(dim=DIM, coarse="flat")) as col:
        buffer, copies = col._live_buf, 0  # noqa: SLF001
        for i in range(300):
            col.upsert([i * 10 + j for j in range(10)], x[i * 10 : i * 10 + 10])
            if col._live_buf is not buffer:  # noqa: SLF001
                buffer, copies = col._live_buf, copies + 1  # noqa: SLF001
        # One to reach 1,024 rows, then by 1/8 at a time: 1024 * (9/8)**10 > 3000, so at most 11 copies, not 300.
        assert copies <= 11
        col.delete([5, 15])
        assert col.count() == 2998 and not col._live[5] and col._live[6]  # noqa: SLF001


@pytest.mark.parametrize("damage", ["garbage", "missing", "stale"])
def test_damaged_ivf_checkpoint_is_rebuilt(tmp_path, data, damage):
    base, queries = data
    path = tmp_path / "c"
    with fill(path, CollectionConfig(dim=DIM), base[:5000]) as col:
        expected = ids(col.search(queries, 10))
    damage_checkpoint(path, damage, 5000)
    with Collection.open(path) as col:
        assert col._coarse.ready  # noqa: SLF001
        again = ids(col.search(queries, 10))
        assert recall_at_k(expected, again, 10) >= 0.95  # retrained lists: near, not identical


KILLED_WRITER = textwrap.dedent(
    f"""
    import sys, numpy as np
    from index import Collection, CollectionConfig
    from index.coarse import IVFCoarse
    from tests.synthetic import embeddings
    IVFCoarse.TRAIN_ROWS = {TRAIN}
    x = embeddings(40_000, {DIM}, clusters=200, seed=21)
    col = Collection.create(sys.argv[1], CollectionConfig(dim={DIM}))
    for b in range(40):
        col.upsert(list(range(b * 1000, b * 1000 + 1000)), x[b * 1000 : b * 1000 + 1000])
        print("done", b, col.rebuilds.running, flush=True)
    """
)


def test_kill_during_a_rebuild_then_reopen(tmp_path):
    path = tmp_path / "c"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    done = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        _, b, running = line.split()
        done = int(b)
        if running == "True" and done >= 8:  # a rebuild (the one at 8k rows or later) is in flight
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before a rebuild was caught running"
    x = embeddings(40_000, DIM, clusters=200, seed=21)
    with Collection.open(path) as col:
        assert col.count() >= (done + 1) * 1000  # every acknowledged batch, maybe the one in flight
        n = col.count()
        assert n % 1000 == 0
        col.rebuilds.wait()
        queries = queries_near(x[:n], 100, seed=22)
        truth = brute_force(x[:n], queries, 10).tolist()
        assert recall_at_k(truth, ids(col.search(queries, 10)), 10) >= 0.95
        assert [r[0] for r in ids(col.search(x[:n:501], 10))] == list(range(0, n, 501))


def test_rebuild_does_not_block_searches(tmp_path, data):
    """While a rebuild holds its thread, searches from other threads complete (none waits for it)."""
    base, queries = data
    col = fill(tmp_path / "c", CollectionConfig(dim=DIM), base[:7_999])
    lock = col._checkpoint_lock  # noqa: SLF001
    lock.acquire()
    try:
        col.upsert([7_999], base[7_999:8_000])
        assert col.rebuilds.running
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(len(col.search(queries, 10)))) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
        assert results == [len(queries)] * 4
        assert col.rebuilds.running  # they all finished while the rebuild was still held
    finally:
        lock.release()
    col.close()
