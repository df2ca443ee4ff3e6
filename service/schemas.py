"""Request and response bodies of the HTTP API (what /docs shows)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from index import CollectionConfig, MultiVectorConfig
from index.config import BinaryTransform, CoarseKind, DenseDtype, Fusion, Metric, SearchMode
from index.errors import InvalidArgument, InvalidVector
from index.filters import KEY_PATTERN as PAYLOAD_KEY_PATTERN
from index.payload_index import PayloadType
from service.filter_schema import FILTER_SCHEMA, ID_SCHEMA

#: Checked by `index.batch.check_id` (whose messages say what to fix); the schema documents it.
PointId = Annotated[StrictInt | StrictStr, WithJsonSchema(ID_SCHEMA)]
#: A vector: JSON numbers, or a base64 string of little-endian float32 bytes (4 bytes per
#: number: about 2.5x smaller than decimal text, and decoded without parsing numbers).
Vector = list[float] | StrictStr
_VECTOR_DOC = "(dim,) numbers, or a base64 string of little-endian float32 bytes"


def vector_array(value: Vector) -> np.ndarray:
    """(n,) float32 from JSON numbers or base64 float32 bytes; raises InvalidVector."""
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidVector("a string vector must be base64 of little-endian float32 bytes") from None
        if len(raw) % 4:
            raise InvalidVector(f"a base64 vector must decode to a multiple of 4 bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)
#: Parsed by `index.filters.Filter.parse` (whose messages say what to fix); documented by FILTER_SCHEMA.
Filter = Annotated[dict[str, Any], WithJsonSchema(FILTER_SCHEMA)]
#: The sources of a point or a query: exactly one is given (the schema's oneOf says so).
_ONE_OF: JsonDict = {"oneOf": [{"required": ["vector"]}, {"required": ["text"]}, {"required": ["vectors"]}]}
_VECTORS_DOC = "(n, dim) numbers: multi-vector collections only"
_TEXT_DOC = ("encoded by the collection's encoder; beyond the model's max_seq_length (minilm: 256 tokens) "
             "it is truncated")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- health -------------------------------------------------------------------------------------
class Status(BaseModel):
    status: str = Field(..., examples=["alive"])


# -- collections --------------------------------------------------------------------------------
class PayloadIndexInfo(BaseModel):
    key: str
    type: PayloadType
    points: int = Field(..., description="live points that hold the key (not null)")
    ram_bytes: int = Field(..., description="RAM of the index's posting lists")


class CollectionCreate(_Body):
    """Body of PUT /collections/{name}. Everything but `dim` (or `encoder`) has a default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["dim"]}, {"required": ["encoder"]}],  # both: the dims must agree
        "examples": [{"encoder": "minilm"}, {"dim": 384, "metric": "dot"}],
    })

    dim: int | None = Field(
        None, ge=1, le=65536, description="vector dimension; defaults to the encoder's when `encoder` is set"
    )
    metric: Metric = "cosine"
    coarse: CoarseKind | None = Field(
        None,
        description="RAM stage: ivf (inverted file of 4-bit PQ codes; the default for single vectors), binary "
        "(sign codes scanned whole; the default for multi-vector), pq (IVF-PQ, 8-bit), flat (exact scan), or "
        "sparse (BM25 over the points' text only; needs an encoder)",
    )
    sparse: bool = Field(
        False, description="a sparse (BM25) stage over the points' text beside the dense one, for hybrid search; "
        "needs an encoder. Points given as vectors have no text: only dense search reaches them",
    )
    bits: Literal[1, 2, 4] = Field(1, description="ivf: bits of code per dimension (RAM: dim * bits / 8 + 8 bytes)")
    nprobe: int | None = Field(
        None, ge=1, le=65536, description="ivf: inverted lists scanned per query; null: the default (256)"
    )
    dtype: DenseDtype = Field("float32", description="dtype of the full vectors on disk")
    oversampling: float | None = Field(
        None, gt=0, le=1000, description="rows reranked from disk = k x oversampling; null: the default"
    )
    binary_transform: BinaryTransform | None = None
    shortlist_factor: float = Field(4.0, ge=1, le=64, description="Hamming shortlist = factor x rows reranked")
    probe_fraction: float = Field(0.25, gt=0, le=1, description="pq: share of inverted lists scanned")
    encoder: str | None = Field(
        None, description="model that turns `text` into vectors (e.g. 'minilm'); null: vectors only"
    )
    multivector: MultiVectorConfig | None = Field(
        None, description="MUVERA parameters: points then carry `vectors` (a set of vectors)"
    )
    target_recall: float | None = Field(
        None, gt=0, le=1,
        description="the recall@10 searches aim for when they set no oversampling or nprobe: each runs with the "
        "cheapest setting whose calibrated recall reaches it (see the search's `target_recall`); not with "
        "`oversampling` or `nprobe`, nor for multi-vector collections",
    )

    def index_config(self, dim: int) -> CollectionConfig:
        """The library's config; a combination it refuses (e.g. `bits` with `coarse: binary`) is a 422."""
        try:
            return self._index_config(dim)
        except ValidationError as exc:
            raise InvalidArgument("; ".join(str(e["msg"]) for e in exc.errors())) from None

    def _index_config(self, dim: int) -> CollectionConfig:
        return CollectionConfig(
            dim=dim, metric=self.metric, coarse=self.coarse, bits=self.bits, nprobe=self.nprobe, dtype=self.dtype,
            oversampling=self.oversampling, binary_transform=self.binary_transform,
            shortlist_factor=self.shortlist_factor, probe_fraction=self.probe_fraction,
            multivector=self.multivector, sparse=self.sparse, target_recall=self.target_recall,
        )


class RecallInfo(BaseModel):
    estimate: float | None = Field(
        ..., description="mean recall@k of the monitor's last samples (served answer against an exact search); "
        "null before the first"
    )
    interval: tuple[float, float] = Field(..., description="its 95% interval")
    samples: int = Field(..., description="samples the estimate is over (the most recent, up to the window)")
    samples_total: int = Field(..., description="samples measured since the server started")
    dropped: int = Field(..., description="sampled searches skipped: over the per-minute cap, or a full queue")
    target: float | None = Field(..., description="the collection's target_recall")
    calibrated_points: int | None = Field(
        ..., description="points when the calibration was measured; null: not calibrated yet (it is on the "
        "first target-recall search)"
    )
    calibrated_at: float | None = Field(..., description="Unix time of that calibration")


class CollectionInfo(BaseModel):
    name: str
    config: CollectionConfig
    encoder: str | None
    points: int = Field(..., description="live points")
    ram_bytes: int = Field(..., description="RAM held by the coarse stage, payload indexes and bookkeeping")
    disk_bytes: int = Field(..., description="bytes of the collection's files")
    created_at: float = Field(..., description="Unix time")
    payload_indexes: list[PayloadIndexInfo] = Field(default_factory=list, description="indexed payload keys")
    recall: RecallInfo | None = Field(
        None, description="the recall that served searches reached, as the live monitor measured it, and the "
        "calibration that target_recall searches choose from",
    )


class CollectionCreated(BaseModel):
    status: Literal["created", "exists"]
    collection: CollectionInfo


class CollectionList(BaseModel):
    collections: list[CollectionInfo]
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="collections that could not be opened at start-up, with why"
    )


class Dropped(BaseModel):
    status: Literal["dropped"] = "dropped"
    name: str


# -- points -------------------------------------------------------------------------------------
class PointIn(_Body):
    """One point: an id and exactly one of `vector`, `text` (or `vectors` for multi-vector)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_OF)

    id: PointId = Field(..., description="a string (1-512 chars) or an integer from 0 to 2**63 - 1")
    vector: Vector | SkipJsonSchema[None] = Field(None, description=_VECTOR_DOC)
    text: str | SkipJsonSchema[None] = Field(None, description=_TEXT_DOC)
    vectors: list[list[float]] | SkipJsonSchema[None] = Field(None, description=_VECTORS_DOC)
    payload: dict[str, Any] | None = Field(None, description="any JSON object, returned with hits")

    @model_validator(mode="after")
    def _one_source(self) -> PointIn:
        given = [k for k in ("vector", "text", "vectors") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"point {self.id!r}: give exactly one of 'vector', 'text' or 'vectors' (got {given or 'none'})"
            )
        return self


class PointsUpsert(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"points": [
        {"id": 1, "text": "a small domesticated carnivorous mammal", "payload": {"lang": "en", "year": 2024}},
        {"id": "doc-2", "text": "a large body of salt water", "payload": {"lang": "en"}},
    ]}]})

    points: list[PointIn] = Field(
        ..., json_schema_extra={"minItems": 1},
        description="upserted atomically: all or none; each id once; at most --max-batch-points",
    )


class UpsertResult(BaseModel):
    status: Literal["completed", "acknowledged"]
    upserted: int


class PointsDelete(_Body):
    ids: list[PointId] = Field(..., min_length=1, json_schema_extra={"uniqueItems": True})


class DeleteResult(BaseModel):
    status: Literal["completed"] = "completed"
    deleted: int = Field(..., description="how many of the ids existed")


class PointOut(BaseModel):
    id: PointId
    vector: list[float] | None = Field(None, description="as stored (normalised under cosine)")
    vectors: list[list[float]] | None = Field(None, description="multi-vector collections: the stored set")
    payload: dict[str, Any] | None
    text: str | None = Field(None, description="the text the point was made from; null for a vector")


# -- search -------------------------------------------------------------------------------------
class SearchRequest(_Body):
    """One search: exactly one of `text`, `vector` (or `vectors` for multi-vector collections)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={**_ONE_OF, "examples": [
        {"text": "a pet that purrs", "k": 5},
        {"text": "a pet that purrs", "filter": {"must": [{"key": "year", "range": {"gte": 2020}}]}},
    ]})

    text: str | SkipJsonSchema[None] = Field(None, description=_TEXT_DOC)
    vector: Vector | SkipJsonSchema[None] = Field(None, description=_VECTOR_DOC)
    vectors: list[list[float]] | SkipJsonSchema[None] = Field(
        None, description="(m, dim) query vector set: multi-vector collections only (scored by MaxSim)"
    )
    k: int = Field(10, ge=1, le=10_000)
    oversampling: float | None = Field(
        None, gt=0, le=1000, description="rows reranked from disk = k x oversampling; null: the collection's"
    )
    nprobe: int | None = Field(
        None, ge=1, le=65536, description="ivf and pq collections: inverted lists probed; null: the collection's"
    )
    target_recall: float | None = Field(
        None, gt=0, le=1,
        description="dense mode: the recall@10 to reach, instead of oversampling and nprobe: the search runs with "
        "the cheapest setting whose measured recall (calibrated on the collection's own points and the live "
        "monitor's samples, lower 95% bound) reaches it, or exactly where none does; the response's `setting` "
        "says which. null: the collection's target_recall, if it has one and no knob is set",
    )
    exact: bool = Field(False, description="brute force over every stored vector (hybrid: for the dense candidates)")
    filter: Filter | None = None
    with_payload: bool = True
    mode: SearchMode | None = Field(
        None, description="collections with a sparse stage: dense (vectors), sparse (BM25 over the points' text; "
        "scores are BM25's) or hybrid (both candidate sets, scored by the exact dense score, then fused with BM25 "
        "as 'fusion' says; scores are the fused ones). null: hybrid for a text where the collection has a sparse "
        "stage, else dense. sparse and hybrid need 'text'",
    )
    fusion: Fusion = Field(
        "convex", description="hybrid: convex (the mean of the dense and BM25 scores, each min-max normalised over "
        "the candidates; measured better on two corpora) or rrf (reciprocal rank fusion, 1 / (60 + rank) summed)",
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [k for k in ("text", "vector", "vectors") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'text', 'vector' or 'vectors' (got {given or 'none'})")
        return self

    @model_validator(mode="after")
    def _target_or_knobs(self) -> SearchRequest:
        if self.target_recall is not None and (self.oversampling is not None or self.nprobe is not None):
            raise ValueError("target_recall picks the oversampling and nprobe itself: give target_recall, or "
                             "oversampling and nprobe, not both")
        if self.target_recall is not None and self.exact:
            raise ValueError("exact: true already finds every neighbour (recall 1): drop target_recall or exact")
        return self


class Hit(BaseModel):
    id: PointId
    score: float
    payload: dict[str, Any] | None = None


class StagesMs(BaseModel):
    encode: float = Field(..., description="queueing and encoding the text; 0 for a vector")
    coarse: float = Field(..., description="candidate selection from RAM codes (the dense stage)")
    sparse: float = Field(0.0, description="candidate selection by BM25 (sparse and hybrid modes)")
    rerank: float = Field(..., description="exact scores of the candidates, read from disk")


class SearchSetting(BaseModel):
    """How a dense search ran."""

    exact: bool = Field(..., description="every stored vector (or every one passing the filter) was scored")
    oversampling: float | None = Field(None, description="rows reranked = k x this; null when exact")
    nprobe: int | None = Field(None, description="inverted lists probed; null when exact or for a stage without lists")
    target_recall: float | None = Field(None, description="the recall aimed for, when one was")
    expected_recall: float | None = Field(
        None, description="for a target: the calibrated recall@10 of the setting chosen (lower 95% bound)"
    )


class SearchResponse(BaseModel):
    hits: list[Hit]
    took_ms: float
    stages_ms: StagesMs
    mode: SearchMode = Field("dense", description="the mode the search ran in")
    setting: SearchSetting | None = Field(None, description="dense mode: the setting the search ran with")
    filter_indexed: bool | None = Field(
        None, description="null without a filter; false when a filter key has no payload index (slower)"
    )


# -- payload indexes, count and facet -----------------------------------------------------------
class PayloadIndexCreate(_Body):
    """Body of PUT /collections/{name}/index."""

    key: str = Field(..., pattern=PAYLOAD_KEY_PATTERN, max_length=256, examples=["lang"],
                     description="payload key; dotted to reach nested objects")
    type: PayloadType = Field(
        ..., description="keyword (strings: match, any, facet), integer and float (numbers: match, range), "
        "bool (match true/false), datetime (RFC 3339 strings: range)"
    )


class PayloadIndexCreated(BaseModel):
    status: Literal["created", "exists"]
    index: PayloadIndexInfo


class PayloadIndexList(BaseModel):
    indexes: list[PayloadIndexInfo]


class CountRequest(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"filter": {"must": [{"key": "lang", "match": "en"}]}}
    ]})

    filter: Filter | None = None


class CountResponse(BaseModel):
    count: int = Field(..., description="live points that pass the filter (exact)")
    filter_indexed: bool | None = None


class FacetRequest(_Body):
    key: str = Field(..., pattern=PAYLOAD_KEY_PATTERN, max_length=256,
                     description="a payload key: its string and boolean values are counted (from its "
                     "keyword or bool index if it has one, else from the stored payloads, slower)")
    filter: Filter | None = None
    limit: int = Field(100, ge=1, le=10_000, description="most values returned")


class FacetValue(BaseModel):
    value: str | bool
    count: int


class FacetResponse(BaseModel):
    key: str
    values: list[FacetValue] = Field(..., description="points per value, most first")
    indexed: bool = Field(..., description="false: the key has no keyword or bool index (counted from payloads)")


class SearchBatch(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"searches": [{"text": "a pet that purrs"}, {"text": "salt water", "k": 3}]}
    ]})

    searches: list[SearchRequest] = Field(..., min_length=1)


class SearchBatchResponse(BaseModel):
    results: list[SearchResponse]
    took_ms: float


# -- ingestion jobs -----------------------------------------------------------------------------
class FileIngest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(
        ..., min_length=1, max_length=10_000,
        description="files under the server's --import-dir, relative to it: .ndjson / .jsonl (one point per line, "
        "as POST .../ingest) or .parquet (columns id, text or vector, payload or other columns)",
    )


class JobAccepted(BaseModel):
    job_id: str
    state: Literal["running"] = "running"
    bytes_received: int


class LineError(BaseModel):
    line: int = Field(..., description="1-based line number in the NDJSON body")
    message: str


class JobState(BaseModel):
    job_id: str
    collection: str
    state: Literal["running", "completed", "failed"]
    lines_read: int
    points_committed: int
    rate_per_s: float = Field(..., description="points committed per second of processing")
    errors: list[LineError] = Field(..., description="the first 100 bad lines")
    error_count: int = Field(..., description="bad lines in total")
    message: str | None = Field(None, description="why a failed job failed")
    created_at: float
    finished_at: float | None


class ErrorDetail(BaseModel):
    type: str = Field(..., description="snake_case error type, e.g. dimension_mismatch")
    message: str = Field(..., description="what was wrong and how to fix it")
    request_id: str


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail


class JobList(BaseModel):
    jobs: list[JobState]
