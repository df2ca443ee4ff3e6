"""Which shard holds a point: a stable hash of its id onto 256 virtual shards, mapped onto S
physical ones.

The hash is BLAKE2b of the id's canonical bytes (an integer id and the same digits as a string
are different ids, as in the library), so every router, on any machine and Python version,
routes a point to the same virtual shard. Virtual shard v lives on physical shard v mod S:
with S dividing 256 the physical shards hold equal shares, and a later split of one physical
shard moves whole virtual shards, never single points.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from index.batch import PointId

VIRTUAL_SHARDS = 256


def virtual_shard(point_id: PointId) -> int:
    kind = b"s" if isinstance(point_id, str) else b"i"
    digest = hashlib.blake2b(kind + str(point_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % VIRTUAL_SHARDS


@dataclass(frozen=True)
class ShardMap:
    """``shards`` physical shards, each held by ``replicas`` copies."""

    shards: int
    replicas: int

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= VIRTUAL_SHARDS:
            raise ValueError(f"shards must be from 1 to {VIRTUAL_SHARDS}, got {self.shards}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")

    def shard_of(self, point_id: PointId) -> int:
        return virtual_shard(point_id) % self.shards

    def split(self, ids: Sequence[PointId]) -> dict[int, list[int]]:
        """``shard -> positions in ids`` of the points each shard holds (shards without any left out)."""
        parts: dict[int, list[int]] = {}
        for position, point_id in enumerate(ids):
            parts.setdefault(self.shard_of(point_id), []).append(position)
        return parts

    def copy_name(self, shard: int, copy: int) -> str:
        return f"shard{shard}-copy{copy}"

    def quorum(self, spec: str | int) -> int:
        """The copies of a shard a write needs: a number from 1 to ``replicas``, ``majority`` or ``all``."""
        if spec == "all":
            return self.replicas
        if spec == "majority":
            return self.replicas // 2 + 1
        try:
            n = int(spec)
        except ValueError:
            raise ValueError(f"write quorum must be a number, 'majority' or 'all', got {spec!r}") from None
        if not 1 <= n <= self.replicas:
            raise ValueError(f"write quorum must be from 1 to the {self.replicas} replicas, got {n}")
        return n
