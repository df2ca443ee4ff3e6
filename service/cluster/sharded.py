"""A collection spread over S shards x R copies, behind the interface the service uses.

Reads go to one copy of each shard they need, in parallel: a copy that fails or does not
answer within ``timeout_s`` is marked down and the read is retried on the shard's next copy,
so a read waits at most R x timeout_s and never hangs. Searches ask every shard for its top k
and merge them by score: exact searches answer what a single node over the same points
answers (ids and scores), since every score is computed alone, on the copy that holds it.

Writes are validated whole on the router first (nothing is sent for a bad batch), then each
shard's points go to every copy of that shard not marked down, in parallel, and the router
waits for each of them (or its timeout). A copy that missed the write (down, failed, refused,
or skipped) is **stale**: the copies that made it durable record that, durably, before the
write is acknowledged (``Copies._missed``); the write succeeds when at least ``write_quorum``
fresh copies of each shard made it durable and recorded the marks (``tandem cluster
--write-quorum``, default 1). A stale copy's commit does not count: it may lack earlier writes.
Reads go to a stale copy only when no fresh copy of its shard answers. Routers load the copies'
marks when they start and every ``CATCH_UP_EVERY_S`` (``Copies.load_stale``), so a restarted
router or another router replica knows them. Once a stale copy answers, a router catches it up
(``ClusterRegistry.catch_up``): each collection from a fresh peer's snapshot, that router's
writes to the shard held, the copy refusing the others' writes under a lease; it serves again
once every peer's mark of it is cleared, which fails if a mark was renewed meanwhile.

What this does not cover: with several router replicas, another router's write that the copy
took just before its lease, and that the peer took after its snapshot, would be missing from
the restored copy; the catch-up sees the peer's count of writes move and runs again, so under
steady writes from other routers a copy may stay stale (served around) for long. Still not
covered: such a write whose call to the peer outlasts the whole catch-up (each copy's writes
are not sequenced, so a catch-up cannot replay what it missed). A write refused by every copy
of a shard (a 503) may be applied on some, until it is retried.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from index import CollectionConfig, CollectionStats, Hit, Point, SearchResult
from index.batch import PointBatch, PointId, VectorSetBatch, check_id, check_ids, check_texts
from index.config import SearchMode
from index.errors import CollectionNotFound, InvalidArgument, TandemError
from service.cluster.sharding import ShardMap
from service.errors import CollectionUnavailable
from service.registry import OpenCollection, check_name, conflict, not_found

logger = logging.getLogger(__name__)

#: ``call(copy, name, method, args, kwargs) -> Future``: a method of a collection on one copy.
Call = Callable[..., "Future[Any]"]  # (shard, copy, name, method, args, kwargs, timeout=None)


class ShardUnavailable(CollectionUnavailable):
    """Every copy of a shard failed or timed out."""


class Copies:
    """Which copies of which shard are up, and calling them with timeouts and retries."""

    def __init__(self, shard_map: ShardMap, call: Call, *, timeout_s: float, retry_down_s: float = 10.0,
                 write_quorum: int = 1) -> None:
        self.map = shard_map
        self.write_quorum = shard_map.quorum(write_quorum)
        self._call = call
        self.timeout_s = timeout_s
        self.retry_down_s = retry_down_s
        self._down: dict[tuple[int, int], float] = {}  # (shard, copy) -> when marked down
        self._stale: dict[tuple[int, int], int] = {}  # copies that missed a write -> when marked (epoch)
        self._epoch = 0  # grows with each mark: a load of the copies' marks keeps marks made meanwhile
        self._next = [0] * shard_map.shards  # round robin over a shard's copies
        self._lock = threading.Lock()
        #: Held while a shard is written, and while a stale copy of it catches up (so no write
        #: lands between its peer's snapshot and its restore).
        self.shard_locks = [threading.Lock() for _ in range(shard_map.shards)]

    def up(self, shard: int) -> list[int]:
        """The shard's copies to try: fresh and up ones first (round robin), then those marked
        down, then stale ones (which missed a write)."""
        now = time.monotonic()
        with self._lock:
            start = self._next[shard]
            self._next[shard] = (start + 1) % self.map.replicas
            order = [(start + i) % self.map.replicas for i in range(self.map.replicas)]
            down = {c for c in order if now - self._down.get((shard, c), -1e18) < self.retry_down_s}
            stale = {c for c in order if (shard, c) in self._stale}
        return sorted(order, key=lambda c: (c in stale, c in down))

    def is_stale(self, shard: int, copy: int) -> bool:
        with self._lock:
            return (shard, copy) in self._stale

    def _add_stale(self, pairs: Any) -> None:
        """Mark ``(shard, copy)`` pairs stale; the caller holds ``_lock``."""
        self._epoch += 1
        for pair in pairs:
            self._stale[pair] = self._epoch

    def mark(self, shard: int, copy: int, *, ok: bool) -> None:
        with self._lock:
            if ok:
                self._down.pop((shard, copy), None)
                return
            if (shard, copy) not in self._down:
                logger.warning("shard %d copy %d marked down", shard, copy)
            self._down[(shard, copy)] = time.monotonic()  # each failure starts the wait anew

    def down(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._down)

    def stale(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._stale)

    def read(self, shards: Sequence[int], name: str, method: str, args: Callable[[int], tuple[Any, ...]],
             kwargs: dict[str, Any]) -> dict[int, Any]:
        """``method`` on one copy of each shard, in parallel: ``shard -> result``."""
        tries = {s: self.up(s) for s in shards}
        results: dict[int, Any] = {}
        answered: dict[int, int] = {}  # shard -> the copy that answered
        lacking: dict[int, list[int]] = {}  # shard -> copies that lack the collection
        while tries:
            pending = {s: (copies[0], self._call(s, copies[0], name, method, args(s), kwargs))
                       for s, copies in tries.items()}
            failed: dict[int, BaseException] = {}
            for shard, (copy, future) in pending.items():
                try:
                    results[shard] = future.result(timeout=self.timeout_s)
                    answered[shard] = copy
                    self.mark(shard, copy, ok=True)
                except CollectionNotFound as exc:
                    if not name:
                        raise
                    # A copy without a collection the router knows: it restarted on an empty
                    # disk, or missed the create. Its peers answer; it is caught up if they do.
                    lacking.setdefault(shard, []).append(copy)
                    failed[shard] = exc
                except TandemError:
                    raise  # the request's own fault: every copy would say the same
                except Exception as exc:  # died, unreachable, too slow
                    self.mark(shard, copy, ok=False)
                    failed[shard] = exc
            tries = {s: tries[s][1:] for s in failed}
            for shard, rest in tries.items():
                if rest:
                    continue
                if len(lacking.get(shard, ())) == self.map.replicas:
                    raise failed[shard]  # no copy has it: dropped (through another router)
                raise ShardUnavailable(
                    f"shard {shard} of collection {name!r}: no copy answered within {self.timeout_s:g} s "
                    f"({type(failed[shard]).__name__}); retry later"
                )
        for shard, copies in lacking.items():
            if shard not in results:
                continue
            if self.is_stale(shard, answered[shard]) and not all(self.is_stale(shard, c) for c in copies):
                raise not_found(name)  # a fresh copy's answer wins over a stale one's
            self._missed(shard, set(copies), holders=[answered[shard]])
        return results

    def call_one(self, shard: int, copy: int, method: str, args: tuple[Any, ...], timeout_s: float) -> Any:
        """A registry-level ``method`` on one copy (catch-up), with its own timeout."""
        return self._call(shard, copy, "", method, args, {}, timeout=timeout_s).result(timeout=timeout_s + 1)

    def _missed(self, shard: int, copies: set[int], holders: Sequence[int]) -> list[int]:
        """``copies`` of ``shard`` missed what ``holders`` have: stale, here and durably on the
        holders, so that a restarted router and the other router replicas know it too
        (``load_stale``). Returns the holders that recorded it: only they may acknowledge the
        write that caused it."""
        with self._lock:
            self._add_stale((shard, c) for c in copies)
        futures = [self._call(shard, h, "", "mark_stale", (sorted(copies),), {}) for h in holders]
        recorded = []
        for holder, future in zip(holders, futures, strict=True):
            try:
                future.result(timeout=self.timeout_s)
                recorded.append(holder)
            except Exception as exc:
                logger.warning("shard %d copy %d did not record that copies %s are stale: %r", shard, holder,
                               sorted(copies), exc)
        return recorded

    def load_stale(self) -> None:
        """The stale marks the copies hold (``service.cluster.serve.ShardCopyImpl``): for a shard
        whose copies all answered, they replace this router's; else they add to them."""
        with self._lock:
            since = self._epoch
        asked = {(s, c): self._call(s, c, "", "stale_peers", (), {})
                 for s in range(self.map.shards) for c in range(self.map.replicas)}
        found: dict[int, set[int]] = {}
        complete: set[int] = set(range(self.map.shards))
        for (shard, _copy), future in asked.items():
            try:
                marks: dict[int, int] = future.result(timeout=self.timeout_s)
            except Exception:
                complete.discard(shard)
                continue
            found.setdefault(shard, set()).update(marks)
        with self._lock:
            for shard in complete:  # marks made since the question was asked stay
                self._stale = {(s, c): e for (s, c), e in self._stale.items() if s != shard or e > since}
            for shard, copies in found.items():
                for copy in copies:
                    self._stale.setdefault((shard, copy), since)

    def fresh(self, shard: int, copy: int) -> None:
        with self._lock:
            self._stale.pop((shard, copy), None)
            self._down.pop((shard, copy), None)

    def write(self, shards: Sequence[int], name: str, method: str, args: Callable[[int], tuple[Any, ...]],
              kwargs: dict[str, Any]) -> dict[int, Any]:
        """``method`` on every copy of each shard not marked down, in parallel (all of them
        when fewer than the write quorum are up): ``shard -> result`` of one copy that made it
        durable. Raises ``ShardUnavailable`` when fewer than ``write_quorum`` copies of a shard did."""
        locks = [self.shard_locks[s] for s in sorted(set(shards))]  # in order: no deadlock
        for lock in locks:
            lock.acquire()
        try:
            return self._write(shards, name, method, args, kwargs)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _write(self, shards: Sequence[int], name: str, method: str, args: Callable[[int], tuple[Any, ...]],
               kwargs: dict[str, Any]) -> dict[int, Any]:
        now = time.monotonic()
        pending: list[tuple[int, int, Future[Any]]] = []
        missed: dict[int, set[int]] = {}  # shard -> copies that did not make this write durable
        for shard in shards:
            with self._lock:
                live = [c for c in range(self.map.replicas)
                        if now - self._down.get((shard, c), -1e18) >= self.retry_down_s]
                if len(live) < self.write_quorum:
                    live = list(range(self.map.replicas))  # a down mark may be old: try them all
            missed[shard] = {c for c in range(self.map.replicas) if c not in live}
            for copy in live:
                pending.append((shard, copy, self._call(shard, copy, name, method, args(shard), kwargs)))
        results: dict[int, Any] = {}
        durable: dict[int, list[int]] = {}  # shard -> copies that made it durable
        errors: dict[int, BaseException] = {}
        refused: dict[int, TandemError] = {}  # shard -> what a copy of it refused with
        refusing: list[tuple[int, int]] = []
        for shard, copy, future in pending:
            try:
                results[shard] = future.result(timeout=self.timeout_s)
                durable.setdefault(shard, []).append(copy)
                self.mark(shard, copy, ok=True)
            except TandemError as exc:
                refused.setdefault(shard, exc)  # validated on the router: a full disk, or a lost collection
                refusing.append((shard, copy))
            except Exception as exc:  # died, too slow, or being caught up: it may or may not have applied it
                self.mark(shard, copy, ok=False)
                missed[shard].add(copy)
                errors[shard] = exc
        for shard, copy in refusing:  # a copy that refused what a peer committed differs from it now
            missed[shard].add(copy)
        counted: dict[int, list[int]] = {}  # shard -> fresh copies that made it durable (and hold any mark)
        for shard in shards:
            fresh = [c for c in durable.get(shard, []) if not self.is_stale(shard, c)]
            counted[shard] = self._missed(shard, missed[shard], holders=fresh) if missed[shard] and fresh else fresh
        # A stale copy's commit does not count: it may lack earlier writes, and a catch-up replaces it.
        missing = [s for s in shards if len(counted[s]) < self.write_quorum]
        for shard in missing:
            if shard in refused:
                raise refused[shard]  # e.g. every copy's disk is full: the client's answer
        if missing:
            why = errors.get(missing[0])
            raise ShardUnavailable(
                f"collection {name!r}: fewer than the write quorum of {self.write_quorum} copies of shard(s) "
                f"{missing} made the write durable ({type(why).__name__ if why else 'no answer'}); it may be "
                "applied on some copies: retry it (writes are idempotent upserts)"
            )
        return results


class ShardedCollection:
    """The collection interface of ``index.Collection`` that the service uses, over shards."""

    def __init__(self, name: str, config: CollectionConfig, copies: Copies) -> None:
        self.name = name
        self.config = config
        self.copies = copies
        self.calibration = None  # each shard copy calibrates its own part

    @property
    def _shards(self) -> list[int]:
        return list(range(self.copies.map.shards))

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        results = self.copies.read(self._shards, self.name, method, lambda s: args, kwargs)
        return [results[s] for s in self._shards]

    # -- reads --------------------------------------------------------------------------------
    def search_mode(self, mode: SearchMode | None, *, vector: bool, text: bool) -> SearchMode:
        chosen = self.config.search_mode(mode, vector=vector, text=text)
        if chosen != "dense":
            # BM25's statistics and the fusion's normalisation are per shard: their scores do
            # not compare across shards yet.
            raise InvalidArgument(f"mode {chosen!r} is not available in cluster mode yet: search with "
                                  "\"mode\": \"dense\"")
        return chosen

    def search_detailed(self, queries: Any, k: int = 10, **options: Any) -> SearchResult:
        """Every shard's top ``k``, merged by score (see the module doc)."""
        self.search_mode(options.get("mode"), vector=queries is not None, text=options.get("text") is not None)
        parts: list[SearchResult] = self._all("search_detailed", queries, k, **options)
        n = len(parts[0].hits)
        hits: list[list[Hit]] = []
        for i in range(n):
            merged = [h for part in parts for h in part.hits[i]]
            merged.sort(key=lambda h: -h.score)
            hits.append(merged[:k])
        first = parts[0]
        indexed = None if first.filter_indexed is None else all(p.filter_indexed for p in parts)
        return SearchResult(
            hits, max(p.coarse_s for p in parts), max(p.rerank_s for p in parts),
            sum(p.candidates for p in parts), indexed, sparse_s=max(p.sparse_s for p in parts),
            mode=first.mode, setting=first.setting,
        )

    def get(self, id: PointId) -> Point | None:
        point_id = check_id(id)
        shard = self.copies.map.shard_of(point_id)
        result: Point | None = self.copies.read([shard], self.name, "get", lambda s: (point_id,), {})[shard]
        return result

    def count(self, filter: Any = None) -> int:
        return self.count_detailed(filter)[0]

    def count_detailed(self, filter: Any = None) -> tuple[int, bool | None]:
        parts = self._all("count_detailed", filter)
        indexed = None if parts[0][1] is None else all(p[1] for p in parts)
        return sum(p[0] for p in parts), indexed

    def scroll(self, *, filter: Any = None, limit: int = 10, offset: PointId | None = None,
               with_payload: bool = True) -> tuple[list[tuple[PointId, dict[str, Any] | None]], PointId | None]:
        parts = self._all("scroll", filter=filter, limit=limit, offset=offset, with_payload=with_payload)
        merged = sorted((item for page, _ in parts for item in page), key=lambda item: _order(item[0]))
        # The next page starts at the first id not returned: among the pages' leftovers and
        # each shard's own next id (a shard's ids past its page are not in it).
        after = [item[0] for item in merged[limit:]] + [nxt for _, nxt in parts if nxt is not None]
        return merged[:limit], min(after, key=_order) if after else None

    def facet(self, key: str, *, filter: Any = None, limit: int = 100) -> tuple[list[tuple[Any, int]], bool]:
        parts = self._all("facet", key, filter=filter, limit=10_000)
        totals: dict[Any, int] = {}
        for values, _ in parts:
            for value, n in values:
                totals[(type(value).__name__, value)] = totals.get((type(value).__name__, value), 0) + n
        ranked = sorted(((v, n) for (_, v), n in totals.items()), key=lambda vn: (-vn[1], str(vn[0])))
        return ranked[:limit], all(p[1] for p in parts)

    def payload_indexes(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for part in self._all("payload_indexes"):
            for key, info in part.items():
                seen = out.setdefault(key, {"type": info["type"], "points": 0, "ram_bytes": 0})
                seen["points"] += info["points"]
                seen["ram_bytes"] += info["ram_bytes"]
        return out

    def stats(self) -> CollectionStats:
        parts: list[CollectionStats] = self._all("stats")
        return CollectionStats(*(sum(values) for values in zip(*parts, strict=True)))

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[PointId], vectors: Any, payloads: Sequence[Any] | None = None,
               texts: Sequence[str | None] | None = None) -> int:
        """All the batch's checks on the router, then each shard's points to its copies. The
        vectors are sent as given (each copy normalises them as a single node would)."""
        if self.config.multivector is None:
            PointBatch.build(ids, vectors, payloads, dim=self.config.dim, normalize=False)
            rows: Any = np.asarray(vectors, dtype=np.float32)
        else:
            mv = self.config.multivector
            VectorSetBatch.build(ids, vectors, payloads, dim=self.config.dim, normalize=False,
                                 max_vectors=mv.max_vectors)
            rows = list(vectors)
        checked_texts = check_texts(texts, len(ids))
        parts = self.copies.map.split(list(ids))

        def args(shard: int) -> tuple[Any, ...]:
            at = parts[shard]
            return (
                [ids[i] for i in at],
                rows[at] if isinstance(rows, np.ndarray) else [rows[i] for i in at],
                None if payloads is None else [payloads[i] for i in at],
                None if checked_texts is None else [checked_texts[i] for i in at],
            )

        done = self.copies.write(sorted(parts), self.name, "upsert", args, {})
        return int(sum(done.values()))

    def delete(self, ids: Sequence[PointId]) -> int:
        keys = check_ids(ids)
        parts = self.copies.map.split(keys)
        done = self.copies.write(sorted(parts), self.name, "delete", lambda s: ([keys[i] for i in parts[s]],), {})
        return int(sum(done.values()))

    def create_payload_index(self, key: str, type: Any) -> bool:
        done = self.copies.write(self._shards, self.name, "create_payload_index", lambda s: (key, type), {})
        return any(done.values())

    def drop_payload_index(self, key: str) -> bool:
        done = self.copies.write(self._shards, self.name, "drop_payload_index", lambda s: (key,), {})
        return any(done.values())

    def record_recall(self, *_: Any) -> None:
        """Monitor samples stay with the router: each copy calibrates its own part."""

    def close(self, *, checkpoint: bool = True) -> None:
        """The copies own the files: nothing to close on the router."""


def _order(key: PointId) -> tuple[bool, int, str]:
    """Points in the order a collection scrolls them: integers, then strings."""
    return (isinstance(key, str), key if isinstance(key, int) else 0, key if isinstance(key, str) else "")


class ClusterRegistry:
    """``service.registry.CollectionRegistry``'s interface over the shard copies: every copy
    holds every collection (its share of the points). Creates and drops go to every copy."""

    #: How often stale copies are checked for being back, and caught up.
    CATCH_UP_EVERY_S = 2.0
    #: A snapshot's transfer and restore may take this long.
    SNAPSHOT_TIMEOUT_S = 600.0

    def __init__(self, copies: Copies) -> None:
        self.copies = copies
        self.broken: dict[str, str] = {}
        self._open: dict[str, OpenCollection] = {}
        self._lock = threading.Lock()
        self._dropped: set[str] = set()  # dropped through this router (a late listing may still hold them)
        self._stop = threading.Event()
        self._catching_up = threading.Thread(target=self._catch_up_loop, name="catch-up", daemon=True)

    def _catch_up_loop(self) -> None:
        while not self._stop.wait(self.CATCH_UP_EVERY_S):
            try:
                self.copies.load_stale()  # marks made by other routers, or before a restart
            except Exception as exc:
                logger.warning("stale marks not read: %r", exc)
            for shard, copy in self.copies.stale():
                try:
                    self.catch_up(shard, copy)
                except Exception as exc:  # still down, or its peer is: try again later
                    logger.warning("shard %d copy %d not caught up yet: %r", shard, copy, exc)

    def catch_up(self, shard: int, copy: int) -> None:
        """Make a stale copy equal to a fresh copy of its shard: each collection from the peer's
        snapshot; collections the peer no longer has, dropped. This router's writes to the shard
        wait meanwhile. The copy refuses other routers' writes under a lease (renewed for each
        collection), so that they mark it stale again: clearing the marks seen before the
        snapshot then fails and it is caught up once more. It serves again once every peer's
        mark of it is cleared."""
        call = self.copies.call_one
        timeout = self.copies.timeout_s
        replicas = self.copies.map.replicas
        lease = (uuid.uuid4().hex, 2 * self.SNAPSHOT_TIMEOUT_S + 60)
        call(shard, copy, "ping", (), timeout)  # back at all?
        try:
            if not call(shard, copy, "lease", lease, lease[1] + timeout):
                return  # another router is catching it up
            with self.copies.shard_locks[shard]:
                marks: dict[int, dict[int, int]] = {}  # each copy's marks, as before the snapshot
                for other in range(replicas):
                    with contextlib.suppress(Exception):  # it answers later: the copy stays stale
                        marks[other] = call(shard, other, "stale_peers", (), timeout)
                stale = set(self.copies.stale())  # under the lock: no write of this router changes it
                marked = {c for m in marks.values() for c in m}  # by any router, the target included
                peers = [c for c in range(replicas) if c != copy and (shard, c) not in stale and c not in marked]
                if not peers:
                    return  # nothing fresh to copy from
                peer = peers[0]
                # Writes the peer ends from here on may be missing from its snapshot but taken by
                # the copy before its lease (another router's): then the copy is caught up again.
                before = call(shard, peer, "writes", (), timeout)
                have = {m["name"] for m in call(shard, copy, "collections", (), timeout)}
                want = [m["name"] for m in call(shard, peer, "collections", (), timeout)]
                for name in have - set(want):
                    call(shard, copy, "restore_drop", (name,), timeout)
                for name in want:
                    if not call(shard, copy, "lease", lease, lease[1] + timeout):  # renewed: still ours
                        return
                    data = call(shard, peer, "snapshot", (name,), self.SNAPSHOT_TIMEOUT_S)
                    call(shard, copy, "restore", (name, data), self.SNAPSHOT_TIMEOUT_S)
                if call(shard, peer, "writes", (), timeout) != before:
                    logger.warning("shard %d copy %d restored from copy %d, which took writes meanwhile (another "
                                   "router's): it is caught up again", shard, copy, peer)
                    return
                others = [c for c in range(replicas) if c != copy]
                cleared = [c in marks and call(shard, c, "clear_stale", (copy, marks[c].get(copy)), timeout)
                           for c in others]
                if not all(cleared):
                    logger.warning("shard %d copy %d restored from copy %d, but missed a write meanwhile or a "
                                   "peer did not answer: it is caught up again", shard, copy, peer)
                    return
                self.copies.fresh(shard, copy)
        finally:
            with contextlib.suppress(Exception):  # else the lease runs out
                call(shard, copy, "end_restore", (lease[0],), timeout)
        logger.warning("shard %d copy %d caught up from copy %d (%d collections)", shard, copy, peer, len(want))

    def _every_copy(self, method: str, *args: Any) -> list[Any]:
        shards = list(range(self.copies.map.shards))
        return list(self.copies.write(shards, "", method, lambda s: args, {}).values())

    def open_all(self, wait_s: float = 300.0) -> list[str]:
        """The collections the copies hold (each copy answers with its own list: they agree).
        Waits up to ``wait_s`` for a copy of shard 0 to answer: copies start with the router."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                listed: list[dict[str, Any]] = self.copies.read([0], "", "collections", lambda s: (), {})[0]
                break
            except ShardUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        listed = [m for m in listed if m["name"] not in self._dropped]
        if wait_s > 0:  # at start-up, before serving: which copies missed writes
            self.copies.load_stale()
        with self._lock:
            for meta in listed:
                if meta["name"] not in self._open:
                    self._open[meta["name"]] = self._opened(meta)
            if not self._catching_up.is_alive():
                self._catching_up.start()
            return sorted(self._open)

    def _opened(self, meta: dict[str, Any]) -> OpenCollection:
        config = CollectionConfig.model_validate_json(meta["config"])
        return OpenCollection(meta["name"], ShardedCollection(meta["name"], config, self.copies),  # type: ignore[arg-type]
                              meta["encoder"], float(meta["created_at"]))

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def get(self, name: str) -> OpenCollection:
        with self._lock:
            found = self._open.get(name)
        if found is None:
            # Created through another router replica since this one listed them: ask the copies.
            self.open_all(wait_s=0)
            with self._lock:
                found = self._open.get(name)
        if found is None:
            raise not_found(name)
        return found

    def create(self, name: str, config: CollectionConfig, encoder: str | None) -> tuple[OpenCollection, bool]:
        check_name(name)
        with self._lock:
            existing = self._open.get(name)
            if existing is not None:
                if existing.same_as(config, encoder):
                    return existing, False
                raise conflict(name, existing)
            metas = self._every_copy("create", name, config.model_dump_json(), encoder, time.time())
            opened = self._opened(metas[0])
            self._open[name] = opened
            self._dropped.discard(name)
        return opened, True

    def drop(self, name: str) -> None:
        with self._lock:
            opened = self._open.pop(name, None)
            if opened is None:
                raise not_found(name)
            opened.dropped = True
            self._dropped.add(name)
        self._every_copy("drop", name)

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            self._open = {}
