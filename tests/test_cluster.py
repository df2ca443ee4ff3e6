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


def test_cluster_flags_are_checked() -> None:
    from service.cluster.serve import ClusterOptions

    options = ClusterOptions.parse(shards=4, replicas=3, write_quorum="majority", encoder_max_replicas=0)
    assert (options.shard_map, options.write_quorum, options.encoder_max_replicas) == (ShardMap(4, 3), 2, 0)
    assert ClusterOptions.parse(replicas=3, write_quorum="all").write_quorum == 3
    for bad, why in ((dict(shards=0), "shards"), (dict(replicas=2, write_quorum=3), "from 1 to the 2"),
                     (dict(write_quorum="most"), "'majority' or 'all'"), (dict(router_replicas=0), "router-replicas"),
                     (dict(encoder_max_replicas=-1), "encoder-max-replicas"), (dict(shard_timeout_s=0), "positive"),
                     (dict(ingest_actors=0), "ingest-actors")):
        with pytest.raises(ValueError, match=why):
            ClusterOptions.parse(**bad)  # type: ignore[arg-type]
    out = subprocess.run([sys.executable, "-m", "service.cli", "cluster", "--replicas", "2", "--write-quorum", "3"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "write quorum must be from 1 to the 2 replicas" in out.stderr


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


KEY = "cluster-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def imports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, imports: Path) -> Iterator[tuple[Server, Server]]:
    """A single node and a 2 x 2 cluster, both with an API key and the same import folder."""
    tmp = tmp_path_factory.mktemp("cluster")
    single = Server(tmp / "single", models_dir, "--import-dir", str(imports), env={"TANDEM_API_KEY": KEY}).start()
    cluster = ClusterServer(tmp / "cluster", models_dir, "--shards", "2", "--replicas", "2", "--import-dir",
                            str(imports),
                            env={"RAY_ADDRESS": "", "RAY_DISABLE_USAGE_STATS": "1", "TANDEM_API_KEY": KEY})
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
        with srv.client(headers=AUTH) as c:
            assert c.put("/collections/c", json={"dim": DIM}).status_code == 201
            for start in range(0, len(base), 500):
                points = [{"id": i if i % 2 else f"p{i}", "vector": base[i].tolist(), "payload": {"even": i % 2 == 0}}
                          for i in range(start, start + 500)]
                r = c.put("/collections/c/points", json={"points": points})
                assert r.status_code == 200, r.text
    with single.client(headers=AUTH) as s, cluster.client(headers=AUTH) as c:
        assert c.get("/collections/c").json()["points"] == 3_000
        even = {"must": [{"key": "even", "match": True}]}
        for q in queries:
            for body in ({"vector": q.tolist(), "k": 10, "exact": True},
                         {"vector": q.tolist(), "k": 5, "exact": True, "filter": even}):
                want = s.post("/collections/c/search", json=body).json()["hits"]
                got = c.post("/collections/c/search", json=body).json()["hits"]
                assert [h["id"] for h in got] == [h["id"] for h in want]
                assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=1e-6)
        # Approximate searches (the default): each shard's own top k, merged, at the single node's recall.
        recall = {}
        for name, client in (("single", s), ("cluster", c)):
            found = 0
            for q in queries:
                body = {"vector": q.tolist(), "k": 10}
                exact = client.post("/collections/c/search", json={**body, "exact": True}).json()["hits"]
                approx = client.post("/collections/c/search", json=body).json()["hits"]
                found += len({h["id"] for h in exact} & {h["id"] for h in approx})
            recall[name] = found / (10 * len(queries))
        assert recall["cluster"] >= recall["single"] - 0.02 and recall["cluster"] >= 0.9, recall
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


def test_cluster_has_the_single_nodes_api_auth_and_errors(pair: tuple[Server, Server]) -> None:
    single, cluster = pair
    with single.client() as s, cluster.client() as c:
        assert c.get("/openapi.json").json() == s.get("/openapi.json").json()  # every route and schema

        def same(method: str, path: str, *, body: bool = True, **kwargs: Any) -> int:
            rs, rc = s.request(method, path, **kwargs), c.request(method, path, **kwargs)
            assert rs.status_code == rc.status_code, (path, rs.text, rc.text)
            if body and rs.headers.get("content-type", "").startswith("application/json"):
                assert _without_ids(rs.json()) == _without_ids(rc.json()), (path, rs.text, rc.text)
            return rs.status_code

        # Auth: the same routes need the key, the same ones do not, with the same answers.
        assert same("GET", "/collections") == 401
        assert same("GET", "/collections", headers={"Authorization": "Bearer wrong"}) == 401
        assert same("GET", "/qdrant/collections") == 401
        assert same("POST", "/v1/embeddings", json={"model": "minilm", "input": "x"}) == 401
        assert same("GET", "/livez") == 200
        assert same("GET", "/collections", headers=AUTH, body=False) == 200  # sizes differ, by design
        # Errors: the same status, type and message for the same mistakes.
        assert same("PUT", "/collections/e", json={"dim": 0}, headers=AUTH) == 422
        assert same("PUT", "/collections/bad name!", json={"dim": 4}, headers=AUTH) in (400, 422)
        assert same("PUT", "/collections/e", json={"dim": 4, "encoder": "nope"}, headers=AUTH) == 422
        assert same("PUT", "/collections/e", json={"dim": 4}, headers=AUTH, body=False) == 201
        assert same("PUT", "/collections/e", json={"dim": 8}, headers=AUTH) == 409
        assert same("POST", "/collections/e/search", json={"vector": [1, 0, 0]}, headers=AUTH) == 422
        assert same("POST", "/collections/e/search", json={"text": "x"}, headers=AUTH) == 422  # no encoder
        assert same("POST", "/collections/e/search", content=b"{not json", headers=AUTH) in (400, 422)
        assert same("GET", "/collections/e/points/7", headers=AUTH) == 404
        assert same("GET", "/jobs/nope", headers=AUTH) == 404
        assert same("POST", "/collections/e/ingest/files", json={"paths": ["../x.ndjson"]}, headers=AUTH) == 403
        assert same("POST", "/collections/e/ingest/files", json={"paths": ["missing.ndjson"]}, headers=AUTH) == 404
        assert same("POST", "/collections/e/ingest/files", json={"paths": []}, headers=AUTH) == 422
        assert same("DELETE", "/collections/e", headers=AUTH) == 200
        assert same("GET", "/collections/e", headers=AUTH) == 404


def _without_ids(body: Any) -> Any:
    """A body without what differs between two servers by design (request ids, times)."""
    if isinstance(body, dict):
        return {k: _without_ids(v) for k, v in body.items() if k not in ("request_id", "created_at", "time")}
    if isinstance(body, list):
        return [_without_ids(v) for v in body]
    return body


WORDS = ("river stone light garden music winter paper engine forest silver market window bridge "
         "signal harbor letter planet circle mirror ladder candle thunder orchard valley").split()


def test_ray_data_ingestion_gives_the_single_nodes_collection(pair: tuple[Server, Server], imports: Path) -> None:
    """A few thousand texts from an NDJSON and a Parquet file: the same job report and the same
    points (payloads, vectors, search answers) on both."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    single, cluster = pair
    rng = np.random.default_rng(5)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(3_000)]
    lines = [json.dumps({"id": i, "text": texts[i], "payload": {"n": i, "even": i % 2 == 0}}) for i in range(2_500)]
    lines[100] = "{not json"  # reported as line 101, skipped
    lines.insert(200, "")  # blank: skipped silently
    (imports / "docs.ndjson").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(2_500, 3_000)], "text": texts[2_500:],
                             "lang": ["en"] * 500}), imports / "more.parquet")
    states = []
    for srv in (single, cluster):
        with srv.client(headers=AUTH) as c:
            assert c.put("/collections/docs", json={"encoder": "minilm"}).status_code == 201
            r = c.post("/collections/docs/ingest/files", json={"paths": ["docs.ndjson", "more.parquet"]})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 300
            while (state := c.get(f"/jobs/{job_id}").json())["state"] == "running":
                assert time.monotonic() < deadline, srv.log()[-3000:]
                time.sleep(0.5)
            states.append(state)
    for state in states:
        assert state["state"] == "completed", state
        assert state["lines_read"] == 3_001 and state["points_committed"] == 2_999
        assert state["errors"] == [{"line": 101, "message": "not valid JSON"}]
        assert state["message"] == "files: docs.ndjson (lines 1-2501), more.parquet (lines 2502-3001)"
    with single.client(headers=AUTH) as s, cluster.client(headers=AUTH) as c:
        assert c.get("/collections/docs").json()["points"] == s.get("/collections/docs").json()["points"] == 2_999
        for key in (0, 7, 1_234, 2_499, "t2500", "t2999"):
            want, got = s.get(f"/collections/docs/points/{key}").json(), c.get(f"/collections/docs/points/{key}").json()
            assert got["payload"] == want["payload"]
            np.testing.assert_allclose(got["vector"], want["vector"], atol=2e-5)  # batches padded differently
        assert c.get("/collections/docs/points/100").status_code == 404
        for query in ("stone bridge over the river", "winter forest", "planet mirror candle"):
            body = {"text": query, "k": 10, "exact": True}
            want, got = s.post("/collections/docs/search", json=body).json(), c.post(
                "/collections/docs/search", json=body).json()
            assert [h["score"] for h in got["hits"]] == pytest.approx([h["score"] for h in want["hits"]], abs=2e-5)
            clear = want["hits"][-1]["score"] + 1e-4  # above the 10th score: no tie can reorder these
            assert {h["id"] for h in got["hits"] if h["score"] > clear} == \
                {h["id"] for h in want["hits"] if h["score"] > clear}


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


def test_write_quorum_and_catch_up_over_real_copies(tmp_path: Path) -> None:
    """The router's replication over two real shard copies (today's engine, each in its own
    folder), called in this process instead of through Ray; a dead copy raises as a dead actor."""
    from concurrent.futures import ThreadPoolExecutor

    from index import CollectionConfig
    from service.cluster.serve import ShardCopyImpl
    from service.cluster.sharded import ClusterRegistry, Copies, ShardUnavailable

    shard_map = ShardMap(1, 2)
    impls = [ShardCopyImpl(str(tmp_path / f"copy{c}")) for c in range(2)]
    dead: set[int] = set()
    before: dict[str, Any] = {}  # method -> what happens once just before the next such call
    pool = ThreadPoolExecutor(4)

    def call(shard: int, copy: int, name: str, method: str, args: Any, kwargs: Any, timeout: Any = None) -> Any:
        def run() -> Any:
            if method in before:
                before.pop(method)()
            if copy in dead:
                raise ConnectionError(f"copy {copy} died")  # as ray.exceptions.ActorDiedError would
            return impls[copy]._call(name, method, args, kwargs)
        return pool.submit(run)

    base = embeddings(300, DIM, seed=21)
    opened: list[ClusterRegistry] = []
    try:
        registries = {q: ClusterRegistry(Copies(shard_map, call, timeout_s=2, write_quorum=q)) for q in (1, 2)}
        opened += registries.values()
        one, both = registries[1], registries[2]
        one.create("c", CollectionConfig(dim=DIM), None)
        both.open_all(wait_s=0)
        assert one.get("c").collection.upsert(list(range(100)), base[:100]) == 100
        dead.add(1)
        with pytest.raises(ShardUnavailable, match="write quorum of 2"):  # one copy of two is not enough
            both.get("c").collection.upsert(list(range(100, 200)), base[100:200])
        assert one.get("c").collection.upsert(list(range(200, 300)), base[200:300]) == 100  # one is
        assert one.copies.stale() == [(0, 1)]
        assert impls[0].registry.get("c").collection.count() == 300  # the refused write applied on copy 0
        # Copy 0 recorded that copy 1 missed writes: a router started now (or another replica) knows.
        restarted = ClusterRegistry(Copies(shard_map, call, timeout_s=2))
        opened.append(restarted)
        restarted.open_all()
        assert restarted.copies.stale() == [(0, 1)]
        dead.clear()
        # While one router catches copy 1 up, it refuses the others' writes, which mark it again.
        assert impls[1]._call("", "lease", ("another-router", 60.0), {}) is True
        restarted.catch_up(0, 1)  # the lease is taken: nothing done
        assert restarted.copies.stale() == [(0, 1)]
        seen = impls[0]._marks()[1]
        assert restarted.get("c").collection.upsert([7], base[7:8]) == 1  # acknowledged by copy 0
        assert impls[0]._marks()[1] > seen and impls[0]._clear(1, seen) is False  # a clear of the old mark fails
        impls[1]._call("", "end_restore", ("another-router",), {})
        # Another router's write lands on copy 0 after its snapshot: the restored copy would lack it.
        before["restore"] = lambda: impls[0]._call("c", "upsert", ([8], base[8:9]), {})
        one.catch_up(0, 1)
        assert one.copies.stale() == [(0, 1)] and not before  # restored, but not fresh: caught up again
        one.catch_up(0, 1)  # from copy 0's snapshot
        assert one.copies.stale() == [] and impls[0]._marks() == {}
        restarted.copies.load_stale()
        assert restarted.copies.stale() == []  # the other router learns it too
        assert impls[1].registry.get("c").collection.count() == 300
        q = base[250:251]
        assert [h.id for h in impls[1].registry.get("c").collection.search(q, 5, exact=True)[0]] == \
            [h.id for h in impls[0].registry.get("c").collection.search(q, 5, exact=True)[0]]
        impls[1].registry.drop("c")  # as a copy that restarted on an empty disk
        for _ in range(2):  # whichever copy the round robin asks first: the answer is copy 0's
            assert one.get("c").collection.count() == 300
        assert one.copies.stale() == [(0, 1)]
        assert one.get("c").collection.upsert([300], base[:1]) == 1  # acknowledged: copy 0 has it
        one.catch_up(0, 1)
        assert impls[1].registry.get("c").collection.count() == 301
        with pytest.raises(ValueError, match="from 1 to the 2 replicas"):
            Copies(shard_map, call, timeout_s=2, write_quorum=3)
        assert shard_map.quorum("majority") == 2 and ShardMap(1, 3).quorum("majority") == 2
    finally:
        for registry in opened:  # their catch-up threads first: they call the copies
            registry.close_all()
        for impl in impls:
            impl.registry.close_all()
        pool.shutdown()
