"""OpenAI-compatible embeddings: ``POST /v1/embeddings`` and ``GET /v1/models``, served by the
encoders tandem loaded, so that ``OpenAI(base_url="http://host:8000/v1", api_key=...)`` works
as it does against text-embeddings-inference or infinity.

- ``input``: a string or a list of up to 2,048 non-empty strings. Token arrays are refused: the
  model's own tokenizer runs inside the service.
- ``encoding_format``: ``float`` or ``base64`` (little-endian float32 bytes; the official Python
  client asks for base64 by default and decodes it).
- ``dimensions``: accepted only when it equals the model's (the model cannot shorten them).
- ``usage``: tokens as the model saw them, [CLS] and [SEP] included, after truncation at the
  encoder's max length.
- Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; a malformed
  request is a 400, as OpenAI answers it (tandem's own routes say 422).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from service.deps import ReadyRuntime
from service.errors import BadRequest, NotFound, documented

ERROR_PREFIX = "/v1/"
MAX_INPUTS = 2048

router = APIRouter(prefix="/v1", tags=["openai"])

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error"}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_body(status: int, type_: str, message: str) -> tuple[int, dict[str, Any]]:
    """OpenAI's error shape for a tandem error of ``status`` and snake_case ``type_``."""
    status = 400 if status == 422 else status
    return status, {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": None,
                              "code": _CODES.get(status, type_)}}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., examples=["invalid_request_error"])
    param: str | None = None
    code: str | None = Field(None, examples=["invalid_api_key", "not_found", "bad_request"])


class ErrorBody(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


ERROR_RESPONSES = documented(ErrorBody, {
    400: "malformed or invalid request (OpenAI answers 400 where tandem's own routes say 422)",
    401: "missing or wrong API key",
    404: "no such model, or no such route",
    413: "body over the configured limit",
    429: "overloaded; retry later",
    500: "a bug: the log holds the details under the request id",
    503: "not ready yet (the encoder is loading)",
})


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description=f"a string, or a list of up to {MAX_INPUTS} non-empty strings (token arrays are refused)"
    )
    model: str = Field(..., description="an encoder the server loaded (GET /v1/models), e.g. 'minilm'")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="must equal the model's dimension when given")
    user: str | None = Field(None, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    items: list[Any] = [value] if isinstance(value, str) else list(value)
    if not items:
        raise BadRequest("input must be a string or a non-empty list of strings")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"input holds {len(items)} strings; at most {MAX_INPUTS} per request")
    texts: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest("input holds token ids: send text; the model's own tokenizer runs inside tandem")
        if not item.strip():
            raise BadRequest(f"input[{i}] is empty: every input must hold some text")
        texts.append(item)
    return texts


@router.post("/embeddings", response_model=EmbeddingsResponse, summary="embed texts (OpenAI-compatible)")
async def embeddings(body: EmbeddingsRequest, runtime: ReadyRuntime) -> EmbeddingsResponse:
    encoder = runtime.encoders.get(body.model)
    if encoder is None:
        raise NotFound(f"model {body.model!r} is not loaded here; GET /v1/models lists {sorted(runtime.encoders)}")
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise BadRequest(
            f"dimensions={body.dimensions}: {body.model} gives {encoder.dim}-dimensional embeddings and cannot "
            f"shorten them; omit dimensions or pass {encoder.dim}"
        )
    texts = _texts(body.input)
    vectors = await runtime.encode_bulk(encoder, texts)
    tokens = sum(encoder.count_tokens(texts))
    data = [
        Embedding(index=i, embedding=base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()
                  if body.encoding_format == "base64" else v.astype(float).tolist())
        for i, v in enumerate(vectors)
    ]
    return EmbeddingsResponse(data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/models", response_model=ModelList, summary="the encoders this server loaded (OpenAI-compatible)")
async def models(runtime: ReadyRuntime) -> ModelList:
    return ModelList(data=[Model(id=name, created=int(runtime.started_at)) for name in sorted(runtime.encoders)])
