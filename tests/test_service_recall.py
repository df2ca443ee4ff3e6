"""Recall over HTTP: the live monitor in GET /collections/{name} and /metrics, target_recall on
searches and collections, its 422s, and the calibration across a restart. A real server on
loopback, sampling every search; reference neighbours from numpy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.server import Server
from tests.synthetic import brute_force, embeddings, queries_near

DIM = 64
FLAGS = ("--recall-sample-rate", "1", "--recall-samples-per-minute", "100000", "--recall-cpu-share", "1")


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    return embeddings(12_000, DIM, clusters=60, seed=7)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, base: np.ndarray) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("recall") / "data", models_dir, *FLAGS).start()
    with srv.client() as c:
        configs = {"plain": {"dim": DIM, "bits": 4}, "aimed": {"dim": DIM, "bits": 4, "target_recall": 0.9}}
        for name, config in configs.items():
            assert c.put(f"/collections/{name}", json=config).status_code == 201
            for start in range(0, len(base), 1000):
                points = [{"id": i, "vector": base[i].tolist()} for i in range(start, start + 1000)]
                assert c.put(f"/collections/{name}/points", json={"points": points}).status_code == 200
        wait_trained(c, "plain")
        wait_trained(c, "aimed")
    yield srv
    srv.stop_cleanly()


def wait_trained(c: httpx.Client, name: str) -> None:
    """The coarse stage trains in the background: until then searches are exact."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = {"vector": [1.0] + [0.0] * (DIM - 1), "k": 1}
        if not c.post(f"/collections/{name}/search", json=body).json()["setting"]["exact"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}: the coarse stage never trained")


def recall_of(c: httpx.Client, name: str) -> dict[str, Any]:
    recall: dict[str, Any] = c.get(f"/collections/{name}").json()["recall"]
    return recall


def settle(c: httpx.Client, name: str, samples: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        recall = recall_of(c, name)
        if recall["samples_total"] >= samples:
            return recall
        time.sleep(0.05)
    raise AssertionError(f"{name}: {recall_of(c, name)}, expected {samples} samples")


def test_monitor_estimate_equals_direct_recall(served: Server, base: np.ndarray) -> None:
    queries = queries_near(base, 60, seed=8)
    truth = brute_force(base, queries, 10)
    with served.client() as c:
        before = recall_of(c, "plain")
        direct = []
        for i, q in enumerate(queries):
            body: dict[str, Any] = {"vector": q.tolist(), "k": 10, "with_payload": False}
            if i % 2 == 0:
                body |= {"oversampling": 1.0, "nprobe": 1}  # deliberately weak
            if i % 3 == 0:
                r = c.post("/collections/plain/search/batch", json={"searches": [body]})
                answer = r.json()["results"][0]
            else:
                answer = c.post("/collections/plain/search", json=body).json()
            assert answer["setting"]["exact"] is False
            direct.append(len({h["id"] for h in answer["hits"]} & set(truth[i].tolist())) / 10)
        recall = settle(c, "plain", before["samples_total"] + len(queries))
        # Earlier searches (the wait for training) are in the window too: their mean is known.
        earlier = before["samples"] * (before["estimate"] or 0.0)
        assert recall["samples"] == before["samples"] + len(queries) <= 200 and recall["dropped"] == 0
        assert recall["estimate"] == pytest.approx((earlier + sum(direct)) / recall["samples"], abs=1e-9)
        assert recall["estimate"] < 0.95  # the weak half shows
        lo, hi = recall["interval"]
        assert lo < recall["estimate"] < hi
        exact = c.post("/collections/plain/search", json={"vector": queries[0].tolist(), "exact": True}).json()
        assert exact["setting"] == {"exact": True, "oversampling": None, "nprobe": None, "target_recall": None,
                                    "expected_recall": None}
        time.sleep(0.2)
        assert recall_of(c, "plain")["samples_total"] == recall["samples_total"]  # exact: nothing to measure
        metrics = c.get("/metrics").text
        assert f'tandem_search_recall_count{{collection="plain"}} {float(recall["samples_total"])}' in metrics
        assert 'tandem_search_recall_estimate{collection="plain"}' in metrics
        assert 'tandem_search_recall_target{collection="aimed"} 0.9' in metrics
        assert 'tandem_search_recall_target{collection="plain"}' not in metrics


def test_target_recall_searches(served: Server, base: np.ndarray) -> None:
    queries = queries_near(base, 100, seed=9)
    truth = brute_force(base, queries, 10)
    with served.client() as c:
        for name, extra in (("plain", {"target_recall": 0.9}), ("aimed", {})):
            found, setting = [], None
            for q in queries:
                r = c.post(f"/collections/{name}/search", json={"vector": q.tolist(), "k": 10, **extra})
                assert r.status_code == 200, r.text
                found.append([h["id"] for h in r.json()["hits"]])
                setting = r.json()["setting"]
            assert setting is not None and setting["target_recall"] == 0.9 and setting["expected_recall"] >= 0.9
            achieved = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth.tolist(), strict=True)])
            assert achieved >= 0.9 - 0.03, (name, achieved, setting)  # 100 queries: standard error ~0.015
        # A knob in the search wins over the collection's default target.
        r = c.post("/collections/aimed/search", json={"vector": queries[0].tolist(), "oversampling": 2, "nprobe": 3})
        assert r.json()["setting"] | {"expected_recall": None} == {
            "exact": False, "oversampling": 2.0, "nprobe": 3, "target_recall": None, "expected_recall": None}
        info = recall_of(c, "aimed")
        assert info["target"] == 0.9 and info["calibrated_points"] == len(base) and info["calibrated_at"] > 0


@pytest.mark.parametrize(("body", "says"), [
    ({"target_recall": 0}, "greater than 0"),
    ({"target_recall": 1.5}, "less than or equal to 1"),
    ({"target_recall": "high"}, "valid number"),
    ({"target_recall": 0.9, "oversampling": 4}, "not both"),
    ({"target_recall": 0.9, "nprobe": 8}, "not both"),
    ({"target_recall": 0.9, "exact": True}, "exact"),
    ({"nprobe": 0}, "greater than or equal to 1"),
])
def test_bad_target_recall_is_422(served: Server, body: dict[str, Any], says: str) -> None:
    with served.client() as c:
        r = c.post("/collections/plain/search", json={"vector": [0.1] * DIM, **body})
        assert r.status_code == 422 and says in r.text, r.text
        r = c.post("/collections/plain/search/batch", json={"searches": [{"vector": [0.1] * DIM, **body}]})
        assert r.status_code == 422 and says in r.text, r.text


def test_bad_collection_configs_are_422(served: Server) -> None:
    with served.client() as c:
        for config, says in (({"dim": 8, "target_recall": 0.9, "oversampling": 4}, "not both"),
                             ({"dim": 8, "target_recall": 0.9, "nprobe": 4}, "not both"),
                             ({"dim": 8, "target_recall": 0}, "greater than 0"),
                             ({"dim": 8, "target_recall": 0.9, "multivector": {}}, "single-vector")):
            r = c.put("/collections/refused", json=config)
            assert r.status_code == 422 and says in r.text, (config, r.text)
        assert c.get("/collections/refused").status_code == 404
        assert c.put("/collections/binary", json={"dim": DIM, "coarse": "binary"}).status_code == 201
        r = c.post("/collections/binary/search", json={"vector": [0.1] * DIM, "nprobe": 8})
        assert r.status_code == 422 and "'binary'" in r.text


def test_calibration_survives_a_restart(tmp_path: Path, models_dir: Path, base: np.ndarray) -> None:
    srv = Server(tmp_path / "data", models_dir, *FLAGS).start()
    try:
        with srv.client() as c:
            c.put("/collections/c", json={"dim": DIM, "bits": 4})
            for start in range(0, 9_000, 1000):
                points = [{"id": i, "vector": base[i].tolist()} for i in range(start, start + 1000)]
                c.put("/collections/c/points", json={"points": points})
            wait_trained(c, "c")
            sampled = recall_of(c, "c")["samples_total"]
            first = c.post("/collections/c/search", json={"vector": base[0].tolist(), "target_recall": 0.95}).json()
            calibrated = settle(c, "c", sampled + 1)  # the monitor measured it: a sample for the calibration
            assert calibrated["calibrated_points"] == 9_000
        srv.stop_cleanly()
        srv.start()
        with srv.client() as c:
            assert recall_of(c, "c")["calibrated_at"] == calibrated["calibrated_at"]
            again = c.post("/collections/c/search", json={"vector": base[0].tolist(), "target_recall": 0.95}).json()
            # The same setting; its bound moved by the monitor's sample of the first search,
            # which was stored on shutdown with the calibration.
            assert again["setting"] | {"expected_recall": 0} == first["setting"] | {"expected_recall": 0}
            assert again["setting"]["expected_recall"] != first["setting"]["expected_recall"]
            assert again["setting"]["expected_recall"] == pytest.approx(first["setting"]["expected_recall"], abs=0.01)
            assert recall_of(c, "c")["calibrated_at"] == calibrated["calibrated_at"]  # not measured again
    finally:
        srv.stop_cleanly()
