"""Cluster mode on a real Ray cluster on this machine: `tandem cluster --shards 2 --replicas 2`
against a single node over the same points, through HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.cluster.sharding import ShardMap, virtual_shard
from tests.server import REPO_ROOT, Server, free_port
from tests.synthetic import embeddings, queries_near

DIM = 32


def test_points_go_to_shards_by_a_stable_hash_of_their_id() -> None:
    # Golden values: a router on any machine or Python version must route a point the same way.
    assert [virtual_shard(x) for x in (0, 1, "a", "1", 2**63 - 1, "ü")] == [179, 10, 19, 84, 209, 33]
    four = ShardMap(4, 2)
    counts = np.bincount([four.shard_of(i) for i in range(100_000)], minlength=4)
    assert counts.min() > 24_000 and counts.max() < 26_000  # equal shares (expected 25,000 +- 137)
    parts = four.split(list(range(1000)))
    assert sorted(i for at in parts.values() for i in at) == list(range(1000))
    assert all(four.shard_of(i) == shard for shard, at in parts.items() for i in at)
    for bad in ((0, 1), (257, 1), (2, 0)):
        with pytest.raises(ValueError):
            ShardMap(*bad)


class ClusterServer(Server):
    """`tandem cluster` in a subprocess: it starts a local Ray cluster of its own."""

    def start(self, *, wait_ready: bool = True, timeout: float = 240.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
        env.update(self.env)
        cmd = [sys.executable, "-m", "service.cli", "cluster", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--models-dir", str(self.models_dir), *self.flags]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until stop()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        self.wait("/readyz" if wait_ready else "/livez", timeout)
        return self


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("cluster")
    single = Server(tmp / "single", models_dir).start()
    cluster = ClusterServer(tmp / "cluster", models_dir, "--shards", "2", "--replicas", "2",
                            env={"RAY_ADDRESS": "", "RAY_DISABLE_USAGE_STATS": "1"})
    cluster.port = free_port()
    cluster.url = f"http://127.0.0.1:{cluster.port}"
    cluster.start()
    yield single, cluster
    cluster.stop()
    single.stop()


def test_cluster_answers_as_a_single_node(pair: tuple[Server, Server]) -> None:
    single, cluster = pair
    base = embeddings(3_000, DIM, seed=11)
    queries = queries_near(base, 20, seed=12)
    for srv in (single, cluster):
        with srv.client() as c:
            assert c.put("/collections/c", json={"dim": DIM}).status_code == 201
            for start in range(0, len(base), 500):
                points = [{"id": i if i % 2 else f"p{i}", "vector": base[i].tolist(), "payload": {"even": i % 2 == 0}}
                          for i in range(start, start + 500)]
                r = c.put("/collections/c/points", json={"points": points})
                assert r.status_code == 200, r.text
    with single.client() as s, cluster.client() as c:
        assert c.get("/collections/c").json()["points"] == 3_000
        even = {"must": [{"key": "even", "match": True}]}
        for q in queries:
            for body in ({"vector": q.tolist(), "k": 10, "exact": True},
                         {"vector": q.tolist(), "k": 5, "exact": True, "filter": even}):
                want = s.post("/collections/c/search", json=body).json()["hits"]
                got = c.post("/collections/c/search", json=body).json()["hits"]
                assert [h["id"] for h in got] == [h["id"] for h in want]
                assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-6)
        assert c.get("/collections/c/points/p4").json()["payload"] == {"even": True}

        def scrolled(client: Any) -> list[Any]:  # every id, page by page (through the Qdrant dialect)
            ids, offset = [], None
            while True:
                body = {"limit": 7, "offset": offset, "with_payload": False,
                        "filter": {"must": [{"key": "even", "match": {"value": True}}]}}
                page = client.post("/qdrant/collections/c/points/scroll", json=body).json()["result"]
                ids += [p["id"] for p in page["points"]]
                offset = page["next_page_offset"]
                if offset is None:
                    return ids

        assert scrolled(c) == scrolled(s) and len(scrolled(s)) == 1_500
        assert c.post("/collections/c/count", json={"filter": {"must": [{"key": "even", "match": True}]}}).json() \
            == s.post("/collections/c/count", json={"filter": {"must": [{"key": "even", "match": True}]}}).json()
        bad = {"points": [{"id": 1, "vector": [0.1] * DIM}, {"id": 2, "vector": [0.1] * (DIM - 1)}]}
        rs, rc = s.put("/collections/c/points", json=bad), c.put("/collections/c/points", json=bad)
        assert rs.status_code == rc.status_code == 422
        assert {**rs.json()["error"], "request_id": None} == {**rc.json()["error"], "request_id": None}
        assert c.get("/collections/nope").status_code == 404


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[Any]:
    """A head and two worker nodes on this machine; copy c of every shard is pinned to worker c."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={f"tandem-shard{s}-copy{c}": 1 for s in range(2)})
               for c in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()


def test_a_node_removed_mid_load(three_nodes: Any, tmp_path: Path, models_dir: Path) -> None:
    cluster, workers = three_nodes
    srv = ClusterServer(tmp_path / "data", models_dir, "--shards", "2", "--replicas", "2", "--address",
                        cluster.address, "--shard-timeout-s", "2", env={"RAY_DISABLE_USAGE_STATS": "1"})
    srv.start()
    base = embeddings(2_400, DIM, seed=13)
    queries = queries_near(base, 10, seed=14)
    try:
        with srv.client() as c:
            assert c.put("/collections/c", json={"dim": DIM}).status_code == 201
            for start in range(0, 2_000, 500):
                points = [{"id": i, "vector": base[i].tolist()} for i in range(start, start + 500)]
                assert c.put("/collections/c/points", json={"points": points}).status_code == 200
            cluster.remove_node(workers[0])  # every shard's copy 0 dies with it
            acked = []
            for start in range(2_000, 2_400, 100):  # writes go on: the copies left make them durable
                points = [{"id": i, "vector": base[i].tolist()} for i in range(start, start + 100)]
                r = c.put("/collections/c/points", json={"points": points})
                assert r.status_code == 200, r.text
                acked += range(start, start + 100)
            truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
            for q, want in zip(queries, truth, strict=True):
                t0 = time.monotonic()
                r = c.post("/collections/c/search", json={"vector": q.tolist(), "k": 10, "exact": True})
                assert r.status_code == 200, r.text
                assert time.monotonic() - t0 < 2 * 2 + 5  # each shard: at most a timeout, then the other copy
                assert [h["id"] for h in r.json()["hits"]] == want.tolist()
            assert c.post("/collections/c/count", json={}).json()["count"] == 2_400
            for i in acked[::37]:
                assert c.get(f"/collections/c/points/{i}").status_code == 200

            # The node comes back: its copies restart from their disk, 400 points behind, and
            # catch up from their peers before they serve.
            cluster.add_node(num_cpus=1, resources={f"tandem-shard{s}-copy0": 1 for s in range(2)})
            deadline = time.monotonic() + 120
            while not all(f"shard {s} copy 0 caught up" in srv.log() for s in range(2)):
                assert time.monotonic() < deadline, srv.log()[-3000:]
                time.sleep(0.5)
            cluster.remove_node(workers[1])  # now only the copies that came back hold the data
            assert c.post("/collections/c/count", json={}).json()["count"] == 2_400
            for q, want in zip(queries, truth, strict=True):
                r = c.post("/collections/c/search", json={"vector": q.tolist(), "k": 10, "exact": True})
                assert [h["id"] for h in r.json()["hits"]] == want.tolist()
            for i in acked[::37]:
                assert c.get(f"/collections/c/points/{i}").json()["vector"] is not None
    finally:
        srv.stop()
