"""Recall, measured instead of assumed.

- ``query_recall``: recall@k of one served answer against the exact one.
- ``Tally``: per-query recall samples; their mean, and an interval that follows from how many
  there are and how they spread.
- ``Calibration``: the recall@k each setting of a collection's coarse stage (oversampling, lists
  probed) reached on held-out queries (the collection's own points, each searched without
  itself) and on the live monitor's samples, and what each cost (timed while measuring).
  ``choose`` picks the cheapest setting whose lower bound meets a target; none does: an exact
  search.
- ``RecallMonitor``: repeats a sampled share of served searches exactly, in a low-priority
  thread, within a CPU budget, and keeps a windowed estimate per collection.

The interval is Wilson's score interval on the neighbours found, with the number of neighbours
divided by the design effect of grouping them in queries (cluster sampling): the observed spread
of per-query recall against a binomial one, clipped to [1, k]. At 1 the neighbours count as
independent; at k each query counts as a single trial, the widest a mean of values in [0, 1]
with that mean can spread. So the margin shrinks with the number of queries, and widens when
misses bunch in a few queries.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

logger = logging.getLogger(__name__)

#: z of the two-sided 95% interval reported with an estimate.
Z_REPORT = 1.96
#: z of the one-sided 95% lower bound a calibrated setting must reach to be chosen for a target.
Z_CHOOSE = 1.645
#: Served hits scoring at least the exact k-th score minus this (relative) count as found: ties,
#: and the last bits of a float sum taken in another order.
SCORE_TOLERANCE = 1e-5


def query_recall(served: Sequence[float], exact: Sequence[float], k: int) -> tuple[float, int] | None:
    """recall@k of one served answer (its scores, best first) against the exact one: the share of
    the ``m = min(k, len(exact))`` true neighbours found, where a served hit is one when its score
    reaches the exact ``m``-th best (so ties between equal scores count either way). Returns
    ``(recall, m)``; None when there was nothing to find. The scores must be exact scores, as a
    reranked dense search serves them."""
    m = min(k, len(exact))
    if m == 0:
        return None
    threshold = exact[m - 1] - SCORE_TOLERANCE * max(1.0, abs(exact[m - 1]))
    found = sum(1 for score in served[:k] if score >= threshold)
    return min(found, m) / m, m


def wilson(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` observed over ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    """Per-query recall samples: their count, sum, sum of squares, and true neighbours."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0
    neighbours: int = 0

    def add(self, recall: float, neighbours: int) -> None:
        self.n += 1
        self.total += recall
        self.squares += recall * recall
        self.neighbours += neighbours

    def merge(self, other: Tally) -> None:
        self.n += other.n
        self.total += other.total
        self.squares += other.squares
        self.neighbours += other.neighbours

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def bounds(self, z: float = Z_REPORT) -> tuple[float, float]:
        """The interval of the mean recall (see the module doc); (0, 1) without samples."""
        if self.n == 0:
            return 0.0, 1.0
        p = min(max(self.total / self.n, 0.0), 1.0)
        per_query = self.neighbours / self.n  # k, or fewer where fewer points passed
        binomial = p * (1 - p) / per_query
        spread = max(self.squares / self.n - p * p, 0.0)
        design = 1.0 if binomial <= 0 else min(max(spread / binomial, 1.0), per_query)
        return wilson(p, self.neighbours / design, z)

    def to_list(self) -> list[float]:
        return [self.n, self.total, self.squares, self.neighbours]

    @classmethod
    def of_list(cls, values: Sequence[float]) -> Tally:
        n, total, squares, neighbours = values
        return cls(int(n), float(total), float(squares), int(neighbours))


class Setting(NamedTuple):
    """How an approximate dense search runs: rows reranked = k x ``oversampling``; ``nprobe``
    inverted lists probed (None for a stage without lists)."""

    oversampling: float
    nprobe: int | None

    def key(self) -> str:
        return f"{self.oversampling:g}/{'-' if self.nprobe is None else self.nprobe}"

    @classmethod
    def of_key(cls, key: str) -> Setting:
        oversampling, nprobe = key.split("/")
        return cls(float(oversampling), None if nprobe == "-" else int(nprobe))


class Applied(NamedTuple):
    """The setting a search ran with, as a response reports it."""

    exact: bool
    oversampling: float | None = None
    nprobe: int | None = None
    target_recall: float | None = None
    expected_recall: float | None = None  # the calibration's lower bound for this setting


#: The grid a calibration measures. Oversampling: rows reranked per hit wanted, from the k rows
#: that need no rerank at all to the 32 x k that the PQ stage takes by default. Lists probed:
#: powers of two up to every list.
OVERSAMPLINGS: tuple[float, ...] = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
PROBES: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def probe_grid(lists: int | None) -> list[int | None]:
    if lists is None:
        return [None]
    grid: list[int | None] = [p for p in PROBES if p < lists]
    return [*grid, lists]


class Choice(NamedTuple):
    setting: Setting | None  # None: no calibrated setting meets the target, search exactly
    lower: float  # the lower bound of its recall (1 for an exact search)


@dataclass
class Calibration:
    """The recall@``k`` reached by each setting of a coarse stage (see the module doc)."""

    k: int
    rows: int  # live points when the held-out queries were measured
    lists: int | None  # the stage's inverted lists then (None: a stage without lists)
    measured_at: float
    cells: dict[Setting, Tally] = field(default_factory=dict)
    costs: dict[Setting, float] = field(default_factory=dict)  # measured seconds a query
    monitored: int = 0  # monitor samples added since
    _chosen: dict[tuple[float, int | None], Choice] = field(default_factory=dict, repr=False, compare=False)

    def choose(self, target: float, lists: int | None) -> Choice:
        """The cheapest setting (by its measured cost) whose recall's lower bound (one-sided
        95%) reaches ``target``, with its probe depth scaled to the stage's ``lists`` now (the
        same share of the rows); none: exact search. Remembered until a sample is added."""
        chosen = self._chosen.get((target, lists))
        if chosen is None:
            chosen = self._choose(target, lists)
            if len(self._chosen) >= 64:  # targets are the clients' floats: keep a few
                self._chosen = {}
            self._chosen[(target, lists)] = chosen
        return chosen

    def _choose(self, target: float, lists: int | None) -> Choice:
        best: tuple[float, Setting, float] | None = None
        for setting, tally in self.cells.items():
            lower = tally.bounds(Z_CHOOSE)[0]
            cost = self.costs.get(setting, math.inf)
            if lower >= target and (best is None or cost < best[0]):
                best = (cost, setting, lower)
        if best is None:
            return Choice(None, 1.0)
        setting = best[1]
        if setting.nprobe is not None and lists is not None and self.lists and lists != self.lists:
            setting = Setting(setting.oversampling, min(lists, math.ceil(setting.nprobe * lists / self.lists)))
        return Choice(setting, best[2])

    def record(self, setting: Setting, recall: float, neighbours: int) -> bool:
        """Add a monitor sample taken at ``setting``; False when it is not a calibrated one."""
        tally = self.cells.get(setting)
        if tally is None:
            return False
        tally.add(recall, neighbours)
        self.monitored += 1
        self._chosen = {}
        return True

    def stale(self, rows: int, lists: int | None) -> bool:
        """Whether the collection outgrew it: it doubled, or shrank to half, or was re-clustered."""
        return rows >= 2 * max(self.rows, 1) or 2 * rows <= self.rows or lists != self.lists

    def to_json(self) -> str:
        return json.dumps({
            "k": self.k, "rows": self.rows, "lists": self.lists, "measured_at": self.measured_at,
            "monitored": self.monitored, "cells": {s.key(): t.to_list() for s, t in self.cells.items()},
            "costs": {s.key(): c for s, c in self.costs.items()},
        })

    @classmethod
    def of_json(cls, raw: str) -> Calibration:
        d = json.loads(raw)
        return cls(int(d["k"]), int(d["rows"]), d["lists"], float(d["measured_at"]),
                   {Setting.of_key(key): Tally.of_list(v) for key, v in d["cells"].items()},
                   {Setting.of_key(key): float(v) for key, v in d["costs"].items()}, int(d["monitored"]))

    def table(self) -> list[dict[str, Any]]:
        """Each setting's measured recall: for reports."""
        out = []
        for s, t in sorted(self.cells.items(), key=lambda c: (c[0].nprobe or 0, c[0].oversampling)):
            lo, hi = t.bounds(Z_REPORT)
            out.append({"oversampling": s.oversampling, "nprobe": s.nprobe, "recall": t.mean,
                        "interval": [lo, hi], "lower_95": t.bounds(Z_CHOOSE)[0], "samples": t.n,
                        "cost_ms": self.costs.get(s, math.nan) * 1000})
        return out


# -- the live monitor ---------------------------------------------------------------------------


class Searchable(Protocol):
    """What the monitor needs of a collection (``index.Collection``)."""

    def search_detailed(
        self, queries: Any, k: int = 10, *, filter: Any = None, exact: bool = False, with_payload: bool = True,
        mode: Any = None,
    ) -> Any: ...

    def record_recall(self, setting: Setting, k: int, recall: float, neighbours: int) -> None: ...


class Sample(NamedTuple):
    name: str
    collection: Searchable
    query: Any  # one query: a (1, dim) vector, or a one-element list of query sets
    k: int
    filter: Any
    served: list[float]  # the scores served, best first
    setting: Applied


class Estimate(NamedTuple):
    estimate: float | None
    interval: tuple[float, float]
    samples: int  # in the window the estimate is taken over
    total: int  # ever taken for this collection since the server started
    dropped: int  # sampled but skipped: over the per-minute cap or the queue full


class RecallMonitor:
    """Repeats a ``rate`` share of served searches (at most ``per_minute`` a minute) as exact
    searches, in one background thread that sleeps so that it uses at most ``cpu_share`` of one
    core. Keeps the last ``window`` recall samples per collection.

    Low priority is the budget, not the thread's nice value: a repeat holds the collection's read
    lock (and the GIL at times) while it scans, and a niced thread preempted there would hold up
    a writer and every search queued behind it (measured: no latency gain from nice 19 either).

    The budget counts the monitor thread's own CPU time: numpy's BLAS must run on the calling
    thread (one BLAS thread, as the service sets it), or its helper threads' time goes uncounted.

    ``on_sample(name, recall)`` is called for each sample, ``on_drop(name)`` for each sampled
    search over the cap or the queue (metrics). Filtered searches are
    repeated with the same filter; exact searches are not sampled (their recall is 1)."""

    def __init__(
        self, rate: float, *, per_minute: int = 60, cpu_share: float = 0.05, window: int = 200,
        on_sample: Callable[[str, float], None] | None = None, on_drop: Callable[[str], None] | None = None,
        seed: int | None = None, queue_size: int = 64,
    ) -> None:
        if not 0 <= rate <= 1:
            raise ValueError(f"the recall sample rate is a share of searches in [0, 1], got {rate}")
        if not 0 < cpu_share <= 1:
            raise ValueError(f"cpu_share must be in (0, 1], got {cpu_share}")
        self.rate = rate
        self.per_minute = per_minute
        self.cpu_share = cpu_share
        self.window = window
        self._on_sample = on_sample
        self._on_drop = on_drop
        self._random = random.Random(seed)
        self._queue: queue.Queue[Sample | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._samples: dict[str, collections.deque[tuple[float, int]]] = {}
        self._totals: collections.Counter[str] = collections.Counter()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._taken: collections.deque[float] = collections.deque()  # monotonic times, the last minute
        self._busy_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if rate > 0:
            self._thread = threading.Thread(target=self._run, name="recall-monitor", daemon=True)
            self._thread.start()

    def offer(
        self, name: str, collection: Searchable, queries: Any, k: int, filter: Any,
        served: Iterable[Sequence[float]], setting: Applied,
    ) -> int:
        """Maybe sample some of the queries of a served search; returns how many were queued.
        Never blocks: what the cap or a full queue refuses is counted as dropped."""
        if self.rate <= 0 or setting.exact:
            return 0
        queued = 0
        for i, scores in enumerate(served):
            if self._random.random() >= self.rate:
                continue
            query = queries[i : i + 1]  # (1, dim), or a list of one query set
            try:
                if not self._admit():
                    raise queue.Full
                self._queue.put_nowait(Sample(name, collection, query, k, filter, list(scores), setting))
                queued += 1
            except queue.Full:
                with self._lock:
                    self._dropped[name] += 1
                if self._on_drop is not None:
                    self._on_drop(name)
        return queued

    def _admit(self) -> bool:
        now = time.monotonic()
        with self._lock:
            while self._taken and self._taken[0] <= now - 60:
                self._taken.popleft()
            if len(self._taken) >= self.per_minute:
                return False
            self._taken.append(now)
            return True

    def record(self, name: str, recall: float, neighbours: int) -> None:
        with self._lock:
            window = self._samples.setdefault(name, collections.deque(maxlen=self.window))
            window.append((recall, neighbours))
            self._totals[name] += 1
        if self._on_sample is not None:
            self._on_sample(name, recall)

    def estimate(self, name: str) -> Estimate:
        with self._lock:
            samples = list(self._samples.get(name, ()))
            total, dropped = self._totals[name], self._dropped[name]
        tally = Tally()
        for recall, neighbours in samples:
            tally.add(recall, neighbours)
        return Estimate(tally.mean, tally.bounds(Z_REPORT), tally.n, total, dropped)

    def forget(self, name: str) -> None:
        with self._lock:
            self._samples.pop(name, None)
            self._totals.pop(name, None)
            self._dropped.pop(name, None)

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every queued sample was measured (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop: the sample being measured is finished, those still queued are let go."""
        if self._thread is not None:
            self._stop.set()
            while True:
                try:
                    self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:
                    break
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            sample = self._queue.get()
            try:
                if sample is None or self._stop.is_set():
                    return
                # Within the CPU budget: a sample that took c seconds of CPU is followed by
                # c * (1 / share - 1) seconds of sleep before the next one starts.
                if self._stop.wait(max(0.0, self._busy_until - time.monotonic())):
                    return
                started = time.thread_time()
                self._measure(sample)
                spent = time.thread_time() - started
                self._busy_until = time.monotonic() + spent * (1 / self.cpu_share - 1)
            except Exception:  # a collection closed or dropped meanwhile: skip the sample
                logger.debug("recall sample of %s skipped", sample and sample.name, exc_info=True)
            finally:
                self._queue.task_done()

    def _measure(self, sample: Sample) -> None:
        exact = sample.collection.search_detailed(
            sample.query, sample.k, filter=sample.filter, exact=True, with_payload=False, mode="dense",
        )
        result = query_recall(sample.served, [h.score for h in exact.hits[0]], sample.k)
        if result is None:
            return
        recall, neighbours = result
        self.record(sample.name, recall, neighbours)
        s = sample.setting
        if sample.filter is None and s.oversampling is not None:
            sample.collection.record_recall(Setting(s.oversampling, s.nprobe), sample.k, recall, neighbours)
