"""tandem's index library: binary (or PQ) codes in RAM pick candidates, exact rerank from disk."""

from index import errors
from index.collection import Collection, CollectionStats, Hit, Point, SearchResult
from index.config import CollectionConfig, MultiVectorConfig
from index.filters import Filter

__all__ = [
    "Collection",
    "CollectionConfig",
    "CollectionStats",
    "Filter",
    "Hit",
    "MultiVectorConfig",
    "Point",
    "SearchResult",
    "errors",
]
