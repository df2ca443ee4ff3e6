"""The Ray Serve application of cluster mode.

- ``ShardCopy``: one deployment per (shard, copy), one replica each, holding today's collection
  engine (``CollectionRegistry`` over ``index.Collection``) in its own data directory. Pinned to
  a node by a custom resource when the cluster has one named ``tandem-shard<s>-copy<c>`` (one
  per node, set with ``ray start --resources``); else placed by Ray.
- ``Router``: the FastAPI ingress, the single node's app (``service.app.create_app``) over a
  ``ClusterRegistry``: every route, error and auth rule is the single node's. Stateless;
  ``--router-replicas`` of them, on the head node with Serve's HTTP proxy.
- Bulk ingestion (``POST .../ingest/files``) runs as a job on the router that drives Ray Data
  (``service.cluster.bulk``): an actor pool encodes, the router loads each shard's part.
- ``Encoder``: onnxruntime (``service.cluster.encoding``), stateless, autoscaled between 1 and
  ``--encoder-max-replicas`` replicas by Serve on the requests in flight; the routers hold no
  model. On nodes offering ``tandem-encoder`` units when the cluster has any (one per replica).
  ``--encoder-max-replicas 0``: no encoder deployment, each router encodes in its own process
  (one hop fewer per text query; encoding then scales with ``--router-replicas``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray
from ray import serve

from index import CollectionConfig
from service.cluster.bulk import files_loader
from service.cluster.encoding import EncoderImpl, RemoteEncoder
from service.cluster.sharded import ClusterRegistry, Copies
from service.cluster.sharding import ShardMap
from service.registry import INDEX_DIR, SERVICE_FILE, CollectionRegistry, write_json
from service.runtime import ENCODER_PROVIDERS
from service.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "tandem"
#: A node resource that marks nodes for encoder replicas (one unit each).
ENCODER_RESOURCE = "tandem-encoder"
#: Collection methods a router may call on a copy (reads and writes of ``index.Collection``).
CALLS = frozenset({
    "search_detailed", "get", "count_detailed", "scroll", "facet", "payload_indexes", "stats",
    "upsert", "delete", "create_payload_index", "drop_payload_index",
})
#: Calls that change a copy: refused while it is being caught up.
WRITES = frozenset({"upsert", "delete", "create_payload_index", "drop_payload_index", "create", "drop"})


class Restoring(RuntimeError):
    """A copy being caught up refuses writes: the writer marks it stale again (see ``catch_up``)."""


class ShardCopyImpl:
    """What runs in a shard copy's replica (one at a time: no two replicas share a data dir).

    Beside its collections it keeps, durably, which other copies of its shard missed writes it
    has (``<data dir>.stale.json``: copy -> the mark's generation, which grows with each mark).
    Routers read these marks when they start and every few seconds, so that a restarted router,
    or another router replica, knows which copies must catch up before they serve. While a copy
    is being caught up it refuses writes (``Restoring``), so that a write it misses meanwhile is
    marked on its peers with a new generation and the catch-up's clearing of the old mark fails.
    """

    def __init__(self, data_dir: str) -> None:
        self.registry = CollectionRegistry(Path(data_dir))
        self.registry.open_all()
        self.stale_file = Path(data_dir).with_name(Path(data_dir).name + ".stale.json")
        self._stale_lock = threading.Lock()
        self._lease = threading.Condition()  # guards the three below
        self._lease_token: str | None = None  # the catch-up under way, if any
        self._lease_until = 0.0  # it stops blocking writes then, unless renewed (its router died)
        self._writing = 0  # writes under way
        self._writes = 0  # writes ended since this process started: a catch-up's source must not move

    async def call(self, name: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await asyncio.to_thread(self._call, name, method, args, kwargs)

    def _call(self, name: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method in WRITES:
            with self._lease:
                if self._lease_token is not None and time.monotonic() < self._lease_until:
                    raise Restoring("this copy is being caught up from a peer: it takes writes again once restored")
                self._writing += 1
            try:
                return self._dispatch(name, method, args, kwargs)
            finally:
                with self._lease:
                    self._writing -= 1
                    self._writes += 1  # after the commit (or the failure): never before it
                    self._lease.notify_all()
        if method == "writes":
            with self._lease:
                return self._writes
        return self._dispatch(name, method, args, kwargs)

    def _dispatch(self, name: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "collections":
            return [self._meta(n) for n in self.registry.names()]
        if method == "create":
            collection_name, config_json, encoder, created_at = args
            self.registry.create(collection_name, CollectionConfig.model_validate_json(config_json), encoder)
            return self._meta(collection_name)
        if method in ("drop", "restore_drop"):  # restore_drop: the catch-up's own, under its lease
            self.registry.drop(args[0])
            return True
        if method == "ping":
            return True
        if method == "stale_peers":
            return self._marks()
        if method == "mark_stale":
            return self._mark(set(args[0]))
        if method == "clear_stale":
            return self._clear(int(args[0]), args[1])
        if method == "lease":
            return self._take_lease(*args)
        if method == "end_restore":
            with self._lease:
                if self._lease_token == args[0]:
                    self._lease_token = None
            return True
        if method == "snapshot":
            return self._snapshot(args[0])
        if method == "restore":
            return self._restore(args[0], args[1])
        if method not in CALLS:
            raise ValueError(f"not a collection call: {method!r}")
        opened = self.registry.get(name)
        return opened.guarded(getattr(opened.collection, method), *args, **kwargs)

    def _take_lease(self, token: str, seconds: float) -> bool:
        """Take (or, with the same token, renew) the catch-up lease for ``seconds``; False if
        another catch-up holds it. Once taken, waits for the writes under way to finish."""
        with self._lease:
            now = time.monotonic()
            if self._lease_token not in (None, token) and now < self._lease_until:
                return False
            self._lease_token, self._lease_until = token, now + seconds
            if not self._lease.wait_for(lambda: self._writing == 0, timeout=seconds):
                self._lease_token = None
                return False
            return True

    # -- marks of peers that missed writes -----------------------------------------------------
    def _marks(self) -> dict[int, int]:
        try:
            return {int(c): int(g) for c, g in json.loads(self.stale_file.read_text()).items()}
        except FileNotFoundError:
            return {}

    def _mark(self, copies: set[int]) -> dict[int, int]:
        with self._stale_lock:
            marks = self._marks()
            top = max(marks.values(), default=0)
            for copy in sorted(copies):
                top += 1
                marks[copy] = top
            self._save(marks)
            return marks

    def _clear(self, copy: int, generation: int | None) -> bool:
        """Clear ``copy``'s mark if it is still the one seen (``generation``); False if newer."""
        with self._stale_lock:
            marks = self._marks()
            if marks.get(copy) != generation:
                return False
            if generation is not None:
                del marks[copy]
                self._save(marks)
            return True

    def _save(self, marks: dict[int, int]) -> None:
        write_json(self.stale_file, {str(c): g for c, g in marks.items()})

    def _snapshot(self, name: str) -> bytes:
        """The collection's folder (service.json and a consistent copy of the index) as a tar."""
        opened = self.registry.get(name)
        with tempfile.TemporaryDirectory(dir=self.registry.root.parent) as tmp:
            folder = Path(tmp) / name
            opened.collection.snapshot(folder / INDEX_DIR)
            shutil.copy2(self.registry.root / name / SERVICE_FILE, folder / SERVICE_FILE)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                tar.add(folder, arcname=name)
            return buffer.getvalue()

    def _restore(self, name: str, data: bytes) -> dict[str, Any]:
        """Replace this copy's collection ``name`` by a peer's snapshot of it."""
        staging = self.registry.root / f".{name}.restoring-{uuid.uuid4().hex[:8]}"  # removed on open if left
        staging.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(staging, filter="data")
        self.registry.adopt(name, staging / name)
        shutil.rmtree(staging, ignore_errors=True)
        return self._meta(name)

    def _meta(self, name: str) -> dict[str, Any]:
        opened = self.registry.get(name)
        return {"name": name, "config": opened.collection.config.model_dump_json(), "encoder": opened.encoder,
                "created_at": opened.created_at}

    def __del__(self) -> None:
        self.registry.close_all()


def call_copies(shard_map: ShardMap, pool: ThreadPoolExecutor, timeout_s: float) -> Any:
    """The ``Call`` of ``Copies``: a copy's method through its deployment handle, in a thread."""
    handles = {(s, c): serve.get_deployment_handle(shard_map.copy_name(s, c), app_name=APP_NAME)
               for s in range(shard_map.shards) for c in range(shard_map.replicas)}

    def call(shard: int, copy: int, name: str, method: str, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: float | None = None) -> Future[Any]:
        def run() -> Any:
            response = handles[(shard, copy)].call.remote(name, method, args, kwargs)
            try:
                return response.result(timeout_s=timeout or timeout_s)
            except ray.exceptions.RayTaskError as exc:  # the copy raised: raise what it raised
                cause = exc.cause if hasattr(exc, "cause") else None
                if isinstance(cause, Exception):
                    raise cause from None
                raise

        return pool.submit(run)

    return call


@dataclass(frozen=True)
class ClusterOptions:
    """``tandem cluster``'s own flags (the rest are ``tandem serve``'s ``Settings``)."""

    shard_map: ShardMap
    timeout_s: float = 5.0
    router_replicas: int = 1
    encoder_max_replicas: int = 4
    write_quorum: int = 1  # copies of each shard that must make a write durable
    ingest_max_actors: int = 4  # Ray Data encoder actors of a file ingestion job, at most

    @classmethod
    def parse(cls, *, shards: int = 1, replicas: int = 1, shard_timeout_s: float = 5.0, router_replicas: int = 1,
              encoder_max_replicas: int = 4, write_quorum: str | int = 1, ingest_actors: int = 4) -> ClusterOptions:
        """From ``tandem cluster``'s flags, or a Serve config's ``args``; ValueError says what is wrong."""
        shard_map = ShardMap(int(shards), int(replicas))
        for flag, value in (("router-replicas", router_replicas), ("ingest-actors", ingest_actors)):
            if int(value) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {value}")
        if int(encoder_max_replicas) < 0:
            raise ValueError(f"--encoder-max-replicas must be 0 (routers encode) or more, got {encoder_max_replicas}")
        if float(shard_timeout_s) <= 0:
            raise ValueError(f"--shard-timeout-s must be positive, got {shard_timeout_s}")
        return cls(shard_map, timeout_s=float(shard_timeout_s), router_replicas=int(router_replicas),
                   encoder_max_replicas=int(encoder_max_replicas), write_quorum=shard_map.quorum(write_quorum),
                   ingest_max_actors=int(ingest_actors))


def build(settings: Settings, options: ClusterOptions) -> Any:
    """The application: the shard copies, the encoder and the router, bound."""
    shard_map, timeout_s = options.shard_map, options.timeout_s
    copy_deployment = serve.deployment(name="ShardCopy", max_ongoing_requests=64)(ShardCopyImpl)
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    resources = {r for node in nodes if node.get("Alive") for r in node.get("Resources", {})}
    copies = []
    for s in range(shard_map.shards):
        for c in range(shard_map.replicas):
            name = shard_map.copy_name(s, c)
            pin = f"tandem-{name}"
            actor: dict[str, Any] = {"num_cpus": 0}
            if pin in resources:
                actor["resources"] = {pin: 0.001}
            copies.append(copy_deployment.options(name=name, ray_actor_options=actor).bind(
                str(settings.data_dir / name)))

    encoder = None
    remote = settings.model_dir is not None and options.encoder_max_replicas > 0  # else the routers encode
    if remote:
        encoder = serve.deployment(
            name="Encoder", max_ongoing_requests=8,
            autoscaling_config={"min_replicas": 1, "max_replicas": options.encoder_max_replicas,
                                "target_ongoing_requests": 2},
            # No CPU reserved: onnxruntime's threads are --encoder-threads. On a cluster whose
            # nodes offer "tandem-encoder" (KubeRay's encoder worker group), one unit per replica:
            # replicas past those nodes' units wait for the autoscaler to add one.
            ray_actor_options={"num_cpus": 0, **({"resources": {ENCODER_RESOURCE: 1}}
                                                  if ENCODER_RESOURCE in resources else {})},
        )(EncoderImpl).bind(str(settings.model_dir), settings.encoder_threads, settings.encoder_int8,
                            ENCODER_PROVIDERS[settings.device])

    def app_builder() -> Any:
        from service.app import create_app

        pool = ThreadPoolExecutor(max_workers=4 * shard_map.shards * shard_map.replicas,
                                  thread_name_prefix="shard-call")
        copies = Copies(shard_map, call_copies(shard_map, pool, timeout_s), timeout_s=timeout_s,
                        write_quorum=options.write_quorum)
        load_encoder = None
        if remote:
            def load_encoder(model_dir: Path) -> Any:
                handle = serve.get_deployment_handle("Encoder", app_name=APP_NAME)
                # The first call waits for a replica to load the model.
                return RemoteEncoder(handle, model_dir, timeout_s=max(timeout_s, 30.0))
        load_files = files_loader(
            None if settings.model_dir is None else str(settings.model_dir), quantized=settings.encoder_int8,
            providers=ENCODER_PROVIDERS[settings.device], max_actors=options.ingest_max_actors,
        )
        return create_app(settings, registry=ClusterRegistry(copies), load_encoder=load_encoder,
                          load_files=load_files)

    # On the head node, beside the HTTP proxy (HeadOnly): a worker node lost takes no router with it.
    @serve.deployment(name="Router", num_replicas=options.router_replicas,
                      ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
                      max_ongoing_requests=settings.max_in_flight)
    @serve.ingress(app_builder)
    class Router:
        def __init__(self, *deployments: Any) -> None:
            self.deployments = deployments  # bound so that they deploy with the app

    return cast(Any, Router).bind(*copies, *([encoder] if encoder is not None else []))


def app(args: dict[str, Any]) -> Any:
    """The application for a Serve config (``import_path: service.cluster.serve:app``), as
    KubeRay's RayService deploys it: ``args`` are ``tandem cluster``'s own flags with
    underscores (shards, replicas, write_quorum...); everything else comes from the ``TANDEM_*``
    variables of the process that builds it, as for ``tandem serve``."""
    unknown = set(args) - set(ClusterOptions.parse.__kwdefaults__ or {})
    if unknown:
        raise ValueError(f"unknown cluster args {sorted(unknown)}: use shards, replicas, write_quorum, "
                         "shard_timeout_s, router_replicas, encoder_max_replicas, ingest_actors")
    return build(Settings(), ClusterOptions.parse(**args))


def run(settings: Settings, options: ClusterOptions, *, address: str | None) -> None:
    """Start (or join) Ray, deploy, and serve until interrupted."""
    # A local cluster without Ray's dashboard: 4 processes and ~0.5 GB fewer on this machine.
    ray.init(address=address, namespace="tandem", log_to_driver=True,
             include_dashboard=False if address is None else None)
    # HTTP on the head node only: one address for clients (and KubeRay's head service), and
    # several nodes on one machine do not compete for the port.
    serve.start(http_options={"host": settings.host, "port": settings.port}, proxy_location="HeadOnly")
    serve.run(build(settings, options), name=APP_NAME, route_prefix="/")
    logger.info("cluster mode: %d shards x %d copies on http://%s:%d", options.shard_map.shards,
                options.shard_map.replicas, settings.host, settings.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()  # type: ignore[no-untyped-call]
