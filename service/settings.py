"""The service's configuration: flags of `tandem serve` and `TANDEM_*` environment variables.

Built once in `service.cli.main()` and passed to `service.app.create_app(settings)`; never a
module-level instance. Every field is also a `tandem serve --flag` (see `service.cli`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["debug", "info", "warning", "error"]


class Settings(BaseSettings):
    """Everything `tandem serve` can be told. Field descriptions are the `--help` texts."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="forbid", frozen=True)

    # -- where -----------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    data_dir: Path = Field(Path("data"), description="folder holding the collections and jobs.sqlite")
    models_dir: Path = Field(Path("models"), description="folder holding exported ONNX models")
    import_dir: Path | None = Field(
        None,
        description="folder whose NDJSON and Parquet files POST /collections/{name}/ingest/files may load "
        "(in cluster mode: a path every node sees); unset: that route answers 403",
    )
    encoder: str | None = Field(
        "minilm",
        description="model (a folder under models_dir) loaded for text; empty: no encoder, "
        "vectors only",
    )
    encoder_threads: int | None = Field(
        None, ge=1, le=256, description="onnxruntime threads per encoder call (default: one per core)"
    )
    encoder_int8: bool = Field(
        False,
        description="run the int8 model (feed-forward MatMuls quantized; SciFact nDCG@10 0.6449 vs "
        "0.6451 in float32, about 2x faster on CPU); written by export-model as model.int8.onnx",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="where the encoder (onnxruntime) and the coarse stage (faiss) run: auto (a GPU when one "
        "is visible, else the CPU; the start-up log says which and why), cpu, or gpu (start-up fails without one)",
    )
    # -- security ----------------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="when set, every route but /livez, /readyz and /metrics needs "
        "'Authorization: Bearer <key>'",
    )
    # -- limits ------------------------------------------------------------------------------
    max_batch_points: int = Field(
        1024, ge=1, le=1_000_000, description="most points per PUT .../points request (else 413)"
    )
    max_batch_searches: int = Field(
        256, ge=1, le=100_000, description="most searches per POST .../search/batch request (else 413)"
    )
    max_body_bytes: int = Field(
        64 * 2**20, ge=1024, description="largest JSON request body in bytes (else 413); "
        "NDJSON ingestion is streamed and not bound by it"
    )
    max_line_bytes: int = Field(
        2**20, ge=256, description="longest NDJSON line in bytes; a longer line is reported and skipped"
    )
    ingest_chunk_points: int = Field(
        2048, ge=1, le=100_000,
        description="points parsed, encoded and committed together by an ingestion job (texts are sorted by "
        "length within a chunk: 512 encoded glosses at 0.77x the rate of one sort over 3,000, 2048 at 0.95x)",
    )
    max_in_flight: int = Field(
        128, ge=1, le=1_000_000,
        description="most requests handled at once; one more is answered 429 before its body is read "
        "(never /livez, /readyz, /metrics). Waiting time is about this over the throughput: 128 at "
        "200 requests/s bounds queueing near 0.6 s",
    )
    max_queue_delay_ms: float = Field(
        500, ge=0, le=600_000,
        description="429 at once for a text search that would wait longer than this for the encoder "
        "(queue depth / measured encoder rate); 0: only --search-queue-size bounds the queue",
    )
    search_queue_size: int = Field(
        256, ge=1, le=1_000_000,
        description="most searches waiting for the encoder or a search thread; beyond it: 429",
    )
    batch_wait_ms: float = Field(
        0.5, ge=0, le=1000,
        description="how long a query waits for others to share its encoder batch",
    )
    encode_batch_size: int = Field(
        32, ge=1, le=4096, description="most queries encoded together in one micro-batch"
    )
    # -- recall monitor -----------------------------------------------------------------------
    recall_sample_rate: float = Field(
        0.01, ge=0, le=1,
        description="share of approximate searches repeated exactly in the background to measure their "
        "recall (GET /collections/{name} 'recall', tandem_search_recall); 0: off",
    )
    recall_samples_per_minute: int = Field(
        60, ge=1, le=1_000_000, description="most recall samples taken a minute, over all collections",
    )
    recall_cpu_share: float = Field(
        0.05, gt=0, le=1,
        description="share of one core the recall monitor may use (it sleeps in between), at the lowest priority",
    )
    # -- operations ---------------------------------------------------------------------------
    shutdown_timeout_s: int = Field(
        30, ge=0, le=3600, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    log_level: LogLevel = Field("info", description="log level of the JSON logs on stderr")
    access_log: bool = Field(True, description="log one line per request (client errors at warning)")

    @field_validator("encoder", mode="before")
    @classmethod
    def _no_encoder(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, value: object) -> object:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or raw == "":
            return None
        if not isinstance(raw, str) or raw != raw.strip() or len(raw) < 8:
            raise ValueError(
                "the API key must be at least 8 characters with no surrounding whitespace: "
                "set TANDEM_API_KEY (or --api-key) to a longer token, or leave it unset to disable auth"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value == "gpu":
            # Imported here: faiss is loaded only when a GPU is asked for (--help stays fast).
            from index.device import GpuUnavailable, select

            try:
                select("gpu")
            except GpuUnavailable as exc:
                raise ValueError(
                    f"{exc}. Run the GPU image (docker/Dockerfile.gpu) with a GPU passed to the container "
                    "(docker run --gpus all; nvidia.com/gpu in Kubernetes), or set TANDEM_DEVICE=auto "
                    "(--device auto) to fall back to the CPU"
                ) from None
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Path) -> Path:
        if value.exists() and not value.is_dir():
            raise ValueError(f"data_dir {value} is a file: point TANDEM_DATA_DIR (--data-dir) at a folder")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.encode_batch_size > self.search_queue_size:
            raise ValueError(
                f"encode_batch_size ({self.encode_batch_size}) exceeds search_queue_size "
                f"({self.search_queue_size}): batches could never fill; lower --encode-batch-size "
                "or raise --search-queue-size"
            )
        if self.encoder is not None and ("/" in self.encoder or self.encoder.startswith(".")):
            raise ValueError(
                f"encoder {self.encoder!r} must be a folder name under models_dir, not a path: "
                "set --models-dir to the parent folder and --encoder to the folder's name"
            )
        return self

    @property
    def model_dir(self) -> Path | None:
        """Folder of the configured encoder, or None when the service runs without one."""
        return None if self.encoder is None else self.models_dir / self.encoder
