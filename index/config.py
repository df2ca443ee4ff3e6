"""Collection configuration: what a collection is, fixed at creation and stored in its catalog."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.errors import InvalidArgument

Metric = Literal["cosine", "dot"]
CoarseKind = Literal["ivf", "binary", "pq", "flat", "sparse"]
SearchMode = Literal["dense", "sparse", "hybrid"]
Fusion = Literal["convex", "rrf"]
DenseDtype = Literal["float32", "float16"]
BinaryTransform = Literal["sign", "center", "rotate"]

# Chosen from benchmarks/index_bench.py on 117,659 real MiniLM gloss vectors (README, "Performance"):
# with a Hamming shortlist of 4x rescored asymmetrically in RAM, 10x k rows read from disk gave
# recall@10 0.993 and 16x gave 0.997; 16 keeps a margin for other corpora. PQ codes are coarser
# and need a wider net.
DEFAULT_OVERSAMPLING: dict[str, float] = {"ivf": 16.0, "binary": 16.0, "pq": 32.0, "flat": 1.0, "sparse": 16.0}


class MultiVectorConfig(BaseModel):
    """MUVERA parameters of a multi-vector collection (see ``index.fde``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k_sim: int = Field(5, ge=0, le=10, description="SimHash hyperplanes: 2**k_sim buckets")
    d_proj: int = Field(16, ge=1, description="inner random projection dimension per bucket")
    r_reps: int = Field(20, ge=1, le=200, description="independent repetitions")
    seed: int = Field(42, ge=0)
    d_final: int | None = Field(None, ge=1, description="optional final projection dimension")
    max_vectors: int = Field(2048, ge=1, description="largest vector set accepted per point")


class CollectionConfig(BaseModel):
    """Everything that defines a collection. Immutable once the collection exists."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(..., ge=1, le=65536, description="dimension of the stored vectors")
    metric: Metric = "cosine"
    coarse: CoarseKind = Field(
        None,  # type: ignore[arg-type]  # filled in by _default_coarse before validation
        description="the in-RAM stage: ivf (default for single vectors), binary (default for multi-vector), "
        "pq, flat (exact scan), or sparse (BM25 over the points' text only)",
    )
    sparse: bool = Field(
        False, description="keep a sparse (BM25) stage over the points' text beside the dense one: hybrid search"
    )
    bits: Literal[1, 2, 4] = Field(
        1, description="ivf: bits of code per dimension (4-bit PQ, dim * bits / 4 sub-quantizers)"
    )
    nprobe: int | None = Field(
        None, ge=1, le=65536, description="ivf: inverted lists scanned per query; None: the default (256)"
    )
    dtype: DenseDtype = Field("float32", description="dtype of the full vectors on disk")
    oversampling: float | None = Field(
        None, gt=0, le=1000, description="rows reranked from disk = k * oversampling; None: per-kind default"
    )
    binary_transform: BinaryTransform | None = Field(
        None,
        description="what the sign bits are taken of: the raw vector, minus the corpus mean, or rotated; "
        "None: center for single vectors, sign for multi-vector FDEs",
    )
    shortlist_factor: float = Field(
        4.0, ge=1, le=64, description="Hamming shortlist = shortlist_factor x rows reranked from disk"
    )
    probe_fraction: float = Field(
        0.25, gt=0, le=1,
        description="pq: share of inverted lists scanned per query",
    )
    multivector: MultiVectorConfig | None = None
    target_recall: float | None = Field(
        None, gt=0, le=1,
        description="the recall@10 that searches aim for by default, instead of a fixed oversampling and "
        "nprobe: each picks the cheapest setting whose measured recall (calibrated on the collection's own "
        "points and the live monitor's samples) reaches it; a search's own oversampling or nprobe wins",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_coarse(cls, data: Any) -> Any:
        # Multi-vector FDEs keep sign bits: a query FDE is sparse, a document FDE dense, and
        # their Hamming codes were measured (README "Multi-vector"); single vectors take ivf.
        if isinstance(data, dict) and data.get("coarse") is None:
            data = {**data, "coarse": "binary" if data.get("multivector") is not None else "ivf"}
        return data

    @model_validator(mode="after")
    def _ivf_options_need_ivf(self) -> CollectionConfig:
        if self.coarse != "ivf" and (self.bits != 1 or self.nprobe is not None):
            raise ValueError(
                f"bits and nprobe set the 'ivf' coarse stage, but this collection's is {self.coarse!r}: "
                "drop them, or set coarse to 'ivf'"
            )
        return self

    @model_validator(mode="after")
    def _target_or_knobs(self) -> CollectionConfig:
        if self.target_recall is not None and (self.oversampling is not None or self.nprobe is not None):
            raise ValueError(
                "target_recall picks the oversampling and nprobe itself: give target_recall, or oversampling "
                "and nprobe, not both"
            )
        if self.target_recall is not None and self.multivector is not None:
            raise ValueError("target_recall is calibrated for single-vector collections only: set oversampling "
                             "for a multi-vector one")
        return self

    @model_validator(mode="after")
    def _sparse_needs_single_vectors(self) -> CollectionConfig:
        if self.multivector is not None and self.has_sparse:
            raise ValueError("the sparse stage indexes one text per point: it is not available for multi-vector "
                             "collections; drop 'sparse' or 'multivector'")
        return self

    def search_mode(self, mode: SearchMode | None, *, vector: bool, text: bool) -> SearchMode:
        """The mode a search with (or without) a query ``vector`` and ``text`` runs in: ``mode``,
        or the default (hybrid with a sparse stage and both, sparse with only a text, else
        dense); raises InvalidArgument for what cannot be served."""
        if mode is None:
            mode = "dense" if not self.has_sparse or not text else "hybrid" if vector else "sparse"
        if mode not in ("dense", "sparse", "hybrid"):
            raise InvalidArgument(f"mode must be dense, sparse or hybrid, got {mode!r}")
        if mode != "dense" and not self.has_sparse:
            raise InvalidArgument(
                f"mode {mode!r} needs a sparse stage, and this collection has none: create it with "
                "sparse=True (or coarse='sparse'), or search in dense mode"
            )
        if mode != "dense" and not text:
            raise InvalidArgument(f"mode {mode!r} searches the points' text: give a text query (send 'text')")
        if mode != "sparse" and not vector:
            raise InvalidArgument(f"mode {mode!r} needs a query vector")
        return mode

    @property
    def has_sparse(self) -> bool:
        """Whether the collection keeps a sparse (BM25) stage."""
        return self.sparse or self.coarse == "sparse"

    @property
    def effective_binary_transform(self) -> BinaryTransform:
        # A query FDE is sparse (only the buckets its few vectors fall in), a document FDE dense:
        # centring the query by the documents' mean drowns it (SciFact: recall@10 0.03 at 100
        # candidates with centring, see README "Multi-vector"). Single vectors gain from centring.
        if self.binary_transform is not None:
            return self.binary_transform
        return "sign" if self.multivector is not None else "center"

    @property
    def effective_oversampling(self) -> float:
        if self.oversampling is not None:
            return self.oversampling
        if self.coarse == "ivf":
            # Finer codes rank better: on the glosses (256 lists probed) 1 bit needed 160 rows for
            # recall@10 0.999, 2 bits 40 rows for 0.9988 and 80 for 0.9998, 4 bits 40 for 0.9998.
            return {1: 16.0, 2: 8.0, 4: 4.0}[self.bits]
        return DEFAULT_OVERSAMPLING[self.coarse]
