"""Every metric of the service, in one object with its own `CollectorRegistry`.

Names carry the `tandem_` prefix and a unit suffix; label values come from small fixed sets
(route templates, status codes, stage names, collection names).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Requests span 0.5 ms (a cached vector search) to minutes (a large batch); stages are finer.
_REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
# Recall@k of one sampled search: k = 10 gives steps of 0.1, finer near 1 for larger k.
_RECALL_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
_CANDIDATE_BUCKETS = (10, 25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 51200, 204800, 1e6)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Holds the collectors; `render()` gives the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tandem_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "tandem_request_duration_seconds", "HTTP request duration, first byte in to last byte out",
            ["method", "route", "status"], buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.stage_duration = Histogram(
            "tandem_search_stage_duration_seconds",
            "time per search stage: encode (incl. queueing), coarse (RAM codes), rerank (exact, disk)",
            ["stage"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.candidates = Histogram(
            "tandem_search_candidates", "rows reranked exactly per query",
            buckets=_CANDIDATE_BUCKETS, registry=r,
        )
        self.encode_batch = Histogram(
            "tandem_encode_batch_size", "texts per micro-batch sent to the encoder",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r,
        )
        self.points = Gauge("tandem_points", "live points per collection", ["collection"], registry=r)
        self.queue_depth = Gauge(
            "tandem_search_queue_depth", "searches waiting for the encoder or a search thread", registry=r
        )
        self.ingested_points = Counter(
            "tandem_ingested_points", "points committed by ingestion jobs", registry=r
        )
        self.ingest_failed_lines = Counter(
            "tandem_ingest_failed_lines", "NDJSON lines skipped by ingestion jobs", registry=r
        )
        self.upserted_points = Counter(
            "tandem_upserted_points", "points written through PUT .../points", registry=r
        )
        self.recall = Histogram(
            "tandem_search_recall",
            "recall@k of sampled approximate searches: the served answer against the same search run exactly",
            ["collection"], buckets=_RECALL_BUCKETS, registry=r,
        )
        self.recall_estimate = Gauge(
            "tandem_search_recall_estimate", "mean recall@k over the recall monitor's most recent samples",
            ["collection"], registry=r,
        )
        self.recall_target = Gauge(
            "tandem_search_recall_target", "the collection's target_recall (collections that have one)",
            ["collection"], registry=r,
        )
        self.recall_dropped = Counter(
            "tandem_search_recall_dropped", "sampled searches not measured: over the per-minute cap or a full queue",
            ["collection"], registry=r,
        )
        self.ready = Gauge("tandem_ready", "1 once collections are open and the encoder answered", registry=r)
        ProcessCollector(registry=r)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def set_points(self, collection: str, points: int) -> None:
        self.points.labels(collection).set(points)

    def forget_collection(self, collection: str) -> None:
        for metric in (self.points, self.recall, self.recall_estimate, self.recall_target, self.recall_dropped):
            try:
                metric.remove(collection)
            except KeyError:
                pass

    def set_recall_target(self, collection: str, target: float | None) -> None:
        if target is not None:
            self.recall_target.labels(collection).set(target)

    def observe_recall(self, collection: str, recall: float, estimate: float | None) -> None:
        self.recall.labels(collection).observe(recall)
        if estimate is not None:
            self.recall_estimate.labels(collection).set(estimate)

    def observe_stages(self, encode_s: float | None, coarse_s: float, rerank_s: float, candidates: int) -> None:
        if encode_s is not None:
            self.stage_duration.labels("encode").observe(encode_s)
        self.stage_duration.labels("coarse").observe(coarse_s)
        self.stage_duration.labels("rerank").observe(rerank_s)
        self.candidates.observe(candidates)

    def render(self) -> bytes:
        return generate_latest(self.registry)
