"""tandem's index library: binary (or PQ) codes in RAM pick candidates, exact rerank from disk."""

from index import errors
from index.collection import Collection, CollectionStats, Hit, Point, SearchResult
from index.config import CollectionConfig, MultiVectorConfig
from index.filters import Filter
from index.recall import Applied, Calibration, RecallMonitor

__all__ = [
    "Applied",
    "Calibration",
    "Collection",
    "CollectionConfig",
    "CollectionStats",
    "Filter",
    "Hit",
    "MultiVectorConfig",
    "Point",
    "RecallMonitor",
    "SearchResult",
    "errors",
]
