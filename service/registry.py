"""The named collections the service holds open, on disk under ``data_dir/collections``.

Layout, one folder per collection::

    data_dir/collections/<name>/service.json   # service-level settings: {"name", "encoder", "created_at"}
    data_dir/collections/<name>/index/         # the library's collection (index.Collection)

``service.json`` is written (atomically) before the index is created, so a folder with
``service.json`` and no index is an interrupted create, removed at start-up. A drop first
renames the folder to a hidden name, so a crash mid-drop never leaves a half collection behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from index import Collection, CollectionConfig
from index.errors import CollectionNotFound, TandemError
from service.errors import BadRequest, CollectionUnavailable, ConfigConflict

logger = logging.getLogger(__name__)

T = TypeVar("T")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
SERVICE_FILE = "service.json"
INDEX_DIR = "index"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise BadRequest(
            f"invalid collection name {name[:80]!r}: use 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class OpenCollection:
    """A collection as the service sees it: its name, the library object, its encoder name."""

    name: str
    collection: Collection
    encoder: str | None
    created_at: float
    dropped: bool = False

    def guarded(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a method of the collection; if it was dropped meanwhile, say so (404), not 500."""
        try:
            return fn(*args, **kwargs)
        except Exception:
            if self.dropped:
                raise CollectionNotFound(f"collection {self.name!r} was dropped during the request") from None
            raise

    def same_as(self, config: CollectionConfig, encoder: str | None) -> bool:
        return self.collection.config == config and self.encoder == encoder


class CollectionRegistry:
    """Create, open, list and drop named collections; thread-safe (blocking calls: run in a thread)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "collections"
        self._open: dict[str, OpenCollection] = {}
        #: collections whose files could not be opened at start-up, with why (503 until dropped)
        self.broken: dict[str, str] = {}
        self._lock = threading.Lock()

    def open_all(self) -> list[str]:
        """Open every collection under the root; clean up interrupted creates and drops."""
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                logger.warning("removing %s, left by an interrupted create or drop", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            if not entry.is_dir() or not _NAME.fullmatch(entry.name):
                logger.warning("ignoring %s: not a collection folder", entry)
                continue
            meta_path = entry / SERVICE_FILE
            if not meta_path.is_file():
                logger.warning("ignoring %s: no %s", entry, SERVICE_FILE)
                continue
            if not (entry / INDEX_DIR).exists():
                logger.warning("removing %s: its creation was interrupted", entry)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            self._open_one(entry)
        return sorted(self._open)

    def _open_one(self, entry: Path) -> None:
        try:
            meta = json.loads((entry / SERVICE_FILE).read_text())
            collection = Collection.open(entry / INDEX_DIR)
        except (ValueError, OSError, sqlite3.Error, TandemError) as exc:  # one damaged collection, not all
            self.broken[entry.name] = f"{type(exc).__name__}: {exc}"
            logger.error("collection %s cannot be opened and is unavailable: %s", entry.name, exc)
            return
        with self._lock:
            self._open[entry.name] = OpenCollection(
                entry.name, collection, meta.get("encoder"), float(meta.get("created_at", 0))
            )
        logger.info("opened collection %s: %d points", entry.name, collection.count())

    def adopt(self, name: str, folder: Path) -> OpenCollection:
        """Open the collection folder ``folder`` (a copy made elsewhere) as ``name``, in place of
        any collection of that name (cluster mode: a copy catching up from its peer's snapshot)."""
        check_name(name)
        with self._lock:
            old = self._open.pop(name, None)
            self.broken.pop(name, None)
        if old is not None:
            old.dropped = True
            old.collection.close()
        aside = self.root / f".{name}.replaced-{uuid.uuid4().hex[:8]}"
        if (self.root / name).exists():
            os.rename(self.root / name, aside)  # a crash now: the copy has no such collection; still stale
        os.rename(folder, self.root / name)
        shutil.rmtree(aside, ignore_errors=True)
        self._open_one(self.root / name)
        return self.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._open)

    def get(self, name: str) -> OpenCollection:
        with self._lock:
            found = self._open.get(name)
            unavailable = self._unavailable(name) if found is None and name in self.broken else None
        if unavailable is not None:
            raise unavailable
        if found is None:
            raise not_found(name)
        return found

    def _unavailable(self, name: str) -> CollectionUnavailable:
        return CollectionUnavailable(
            f"collection {name!r} could not be opened at start-up ({self.broken[name]}): restore its "
            f"folder from a backup and restart, or drop it with DELETE /collections/{name}"
        )

    def create(self, name: str, config: CollectionConfig, encoder: str | None) -> tuple[OpenCollection, bool]:
        """The collection and True when created; the existing one and False when identical.

        Raises ConfigConflict when a collection of that name exists with another config.
        """
        check_name(name)
        with self._lock:
            if name in self.broken:  # its files are kept until it is dropped
                raise self._unavailable(name)
            existing = self._open.get(name)
            if existing is not None:
                if existing.same_as(config, encoder):
                    return existing, False
                raise conflict(name, existing)
            folder = self.root / name
            if folder.exists():  # a leftover not opened at start-up
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            meta: dict[str, Any] = {"name": name, "encoder": encoder, "created_at": time.time()}
            write_json(folder / SERVICE_FILE, meta)
            collection = Collection.create(folder / INDEX_DIR, config)
            opened = OpenCollection(name, collection, encoder, float(meta["created_at"]))
            self._open[name] = opened
        logger.info("created collection %s (%s)", name, _describe(config, encoder))
        return opened, True

    def drop(self, name: str) -> None:
        with self._lock:
            opened = self._open.pop(name, None)
            broken = self.broken.pop(name, None)
            if opened is None and broken is None:
                raise CollectionNotFound(f"no collection named {name!r}")
            if opened is not None:
                opened.dropped = True
        # Close first (it waits for in-flight searches: the collection's write lock), then
        # rename: a crash in between leaves the collection whole, as if never dropped.
        if opened is not None:
            opened.collection.close(checkpoint=False)
        trash = self.root / f".{name}.dropping-{uuid.uuid4().hex[:8]}"
        os.rename(self.root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("dropped collection %s", name)

    def close_all(self) -> None:
        with self._lock:
            opened, self._open = list(self._open.values()), {}
        for o in opened:
            try:
                o.collection.close()
            except Exception:
                logger.exception("closing collection %s failed", o.name)


def _describe(config: CollectionConfig, encoder: str | None) -> str:
    return f"dim={config.dim} metric={config.metric} coarse={config.coarse} encoder={encoder}"


def not_found(name: str) -> CollectionNotFound:
    return CollectionNotFound(f"no collection named {name!r}: create it with PUT /collections/{name}")


def write_json(path: Path, data: Any) -> None:
    """Written whole, fsync'd, renamed over ``path``, the rename fsync'd: the old data or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def conflict(name: str, existing: OpenCollection) -> ConfigConflict:
    """What a create of an existing name with another configuration is answered."""
    return ConfigConflict(
        f"collection {name!r} exists with another configuration "
        f"({_describe(existing.collection.config, existing.encoder)}): use another name, or DELETE it first"
    )
