"""Typed errors of the index library.

Every message says what was wrong and how to fix it; the service maps these types to HTTP
status codes in one table (``service/errors.py``).
"""

from __future__ import annotations

import errno
import sqlite3


class TandemError(Exception):
    """Base class of every error the library raises on purpose."""


class InvalidInput(TandemError, ValueError):
    """The caller passed something the library cannot accept; nothing was written."""


class DimensionMismatch(InvalidInput):
    """A vector's length differs from the collection's ``dim``."""


class InvalidVector(InvalidInput):
    """A vector holds NaN or inf, or cannot be normalised (zero vector under cosine)."""


class InvalidId(InvalidInput):
    """A point id is neither a string nor a non-negative integer."""


class DuplicateId(InvalidInput):
    """The same id appears twice in one batch."""


class InvalidPayload(InvalidInput):
    """A payload is not a JSON object."""


class InvalidFilter(InvalidInput):
    """A filter is malformed or uses an unknown operator."""


class EmptyBatch(InvalidInput):
    """A batch with no points, or a vector set with no vectors."""


class InvalidArgument(InvalidInput):
    """Any other argument out of range (``k < 1``, ``oversampling <= 0``, bad config...)."""


class CollectionNotFound(TandemError, LookupError):
    """No collection at the given path or under the given name."""


class CollectionExists(TandemError):
    """A collection already exists at the given path or under the given name."""


class PointNotFound(TandemError, LookupError):
    """No point with the given id."""


class CorruptIndex(TandemError):
    """The collection's files disagree and cannot be recovered to a committed state."""


class StorageFull(TandemError):
    """The disk (or quota, or file size limit) under the collection is full; nothing was written."""


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the operating system or SQLite saying there is no room to write."""
    if isinstance(exc, StorageFull):
        return True
    if exc.__context__ is not None and exc.__context__ is not exc and is_storage_full(exc.__context__):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return False


def storage_full(exc: BaseException, what: str) -> StorageFull:
    return StorageFull(
        f"{what} failed: no space left on the data volume ({exc}). Nothing of it was written; "
        "free space or grow the volume, then send it again"
    )
