"""One table from error types to HTTP statuses, and the one shape every error body has.

    {"error": {"type": "dimension_mismatch", "message": "...", "request_id": "..."}}

Library errors (``index.errors``) and the service's own (below) are looked up along their MRO
in `STATUS`, so a new subclass inherits its parent's status. Anything not in the table is a
bug: it is logged with the request id and answered with a 500 that echoes nothing.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import errors as index_errors
from service.batcher import BatcherClosed, Overloaded
from service.encoder import EncoderNotFound
from service.logs import request_id_var

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error of the HTTP layer itself; subclasses are listed in `STATUS`."""

    headers: dict[str, str] | None = None


class BadRequest(ServiceError):
    """Malformed request: not JSON, a bad path segment, an unsafe collection name."""


class Unauthorized(ServiceError):
    """Missing or wrong API key."""

    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """Not allowed on this server: a file outside --import-dir, or file ingestion switched off."""


class NotFound(ServiceError):
    """No such route, job or point."""


class ConfigConflict(ServiceError):
    """A collection of that name exists with another configuration."""


class BodyTooLarge(ServiceError):
    """The request body exceeds `max_body_bytes`."""


class BatchTooLarge(ServiceError):
    """More points or searches in one request than the configured limit."""


class Unprocessable(ServiceError):
    """Well-formed, but cannot be done: text without an encoder, both text and vector..."""


class NotReady(ServiceError):
    """The service is starting, shutting down, or failed to start."""


class CollectionUnavailable(ServiceError):
    """A collection whose files could not be opened at start-up (damaged, or from a newer version)."""


class EncoderUnavailable(ServiceError):
    """A collection names an encoder this server did not load."""


# The table: most specific types first is not needed, the MRO walk finds the nearest entry.
STATUS: dict[type[Exception], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    index_errors.CollectionNotFound: 404,
    index_errors.PointNotFound: 404,
    ConfigConflict: 409,
    index_errors.CollectionExists: 409,
    BodyTooLarge: 413,
    BatchTooLarge: 413,
    Unprocessable: 422,
    index_errors.InvalidInput: 422,  # DimensionMismatch, InvalidVector, InvalidId, InvalidFilter...
    Overloaded: 429,
    NotReady: 503,
    EncoderUnavailable: 503,
    CollectionUnavailable: 503,
    EncoderNotFound: 503,
    BatcherClosed: 503,
    index_errors.StorageFull: 507,
}


def status_of(exc: BaseException) -> int | None:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return None


def type_name(exc: BaseException) -> str:
    """`DimensionMismatch` -> `dimension_mismatch`."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "request_id": request_id_var.get()}}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


def documented(body: type[Any], descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI ``responses`` table: each status answered with ``body``, described."""
    return {status: {"model": body, "description": text} for status, text in descriptions.items()}


_INTERNAL = "internal error; the server log holds the details under this request id"


def internal_error_response() -> JSONResponse:
    return error_response(500, "internal", _INTERNAL)


#: ``render(status, type, message) -> (status, body)``: a foreign dialect's error shape.
Render = Callable[[int, str, str], tuple[int, dict[str, Any]]]


def _respond(request: Request, status: int, type_: str, message: str,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """tandem's error shape, or that of the dialect (``service.compat``) whose prefix the path has."""
    dialects: dict[str, Render] = getattr(request.app.state, "error_dialects", {})
    for prefix, render in dialects.items():
        if request.url.path.startswith(prefix):
            status, body = render(status, type_, message)
            return JSONResponse(body, status_code=status, headers=headers)
    return error_response(status, type_, message, headers)


async def _mapped(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    if status is None and index_errors.is_storage_full(exc):  # a write outside the library's guarded ones
        logger.error("no space left on the data volume", exc_info=exc)
        return await _mapped(request, index_errors.storage_full(exc, f"{request.method} {request.url.path}"))
    if status is None:
        logger.error("unhandled %s", type(exc).__name__, exc_info=exc)
        return _respond(request, 500, "internal", _INTERNAL)
    return _respond(request, status, type_name(exc), str(exc), getattr(exc, "headers", None))


_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "body_too_large", 415: "unsupported_media_type"}


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI turns an exception raised while reading the body into a 400; ours says 413.
    if isinstance(exc.__cause__, BodyTooLarge):
        return await _mapped(request, exc.__cause__)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}: see /docs"
    if exc.status_code >= 500:
        return _respond(request, 500, "internal", _INTERNAL)
    return _respond(request, exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), message,
                    dict(exc.headers) if exc.headers else None)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return _respond(request, 400, "invalid_json", "the request body is not valid JSON")
    parts = []
    for p in problems[:10]:
        loc = ".".join(str(x) for x in p.get("loc", ()) if x != "body")
        msg = str(p.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    return _respond(request, 422, "validation_error", "; ".join(parts) + more)


def install(app: FastAPI, dialects: dict[str, Render] | None = None) -> None:
    """Register the handlers; the request-context middleware answers anything that escapes.
    ``dialects``: path prefix -> error shape of a foreign API served under it."""
    app.state.error_dialects = dict(dialects or {})
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]  # starlette's handler type is too narrow
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]  # idem
    for cls in (*STATUS, OSError, sqlite3.Error):  # the last two: 507 when the disk is full, else 500
        app.add_exception_handler(cls, _mapped)
