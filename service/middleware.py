"""The request-context middleware (pure ASGI, no per-request task): request id, body limit,
metrics, access log, and the last-resort 500.

- ``x-request-id``: an incoming one is kept when it is sane (printable, at most 128 chars),
  else a new one is made; it is on every response and in every log line of the request.
- Bodies over `max_body_bytes` are answered 413 (from Content-Length at once, or while
  reading a chunked body), except on the streamed NDJSON ingestion route.
- One Prometheus observation per request, labelled by route template (``/collections/{name}``),
  never by raw path, so label values stay a small set.
- At most `max_in_flight` requests are handled at once; one more is answered 429 before its body
  is read (the probes and /metrics are never refused), so that past capacity the server sheds
  load at the cost of a few microseconds per request instead of queueing it for seconds.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, error_response, internal_error_response
from service.logs import request_id_var
from service.metrics import Metrics

logger = logging.getLogger("service.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
_STREAMED_SUFFIX = "/ingest"
_NEVER_REFUSED = frozenset({"/livez", "/readyz", "/metrics"})


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, access_log: bool, max_in_flight: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        rid = _request_id(scope)
        token = request_id_var.set(rid)
        status = 500
        started = False
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        limited = not scope["path"].endswith(_STREAMED_SUFFIX)
        counted = scope["path"] not in _NEVER_REFUSED  # probes and scrapes neither count nor wait
        self.in_flight += counted
        try:
            if counted and self.in_flight > self.max_in_flight:
                await error_response(
                    429, "overloaded",
                    f"{self.max_in_flight} requests already in progress (--max-in-flight); retry later",
                )(scope, receive, send_with_id)
            elif limited and _content_length(scope) > self.max_body_bytes:
                await self._too_large(scope, receive, send_with_id)
            else:
                await self.app(scope, self._counting(receive) if limited else receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await internal_error_response()(scope, receive, send_with_id)
        finally:
            self.in_flight -= counted
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (scope["method"], template, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_duration.labels(*labels).observe(elapsed)
            if self.access_log or status >= 400:
                level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
                logger.log(
                    level, "%s %s %d", scope["method"], scope["path"], status,
                    extra={"method": scope["method"], "route": template, "status": status,
                           "duration_ms": round(elapsed * 1000, 3)},
                )
            request_id_var.reset(token)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = BodyTooLarge(
            f"request body of {_content_length(scope)} bytes exceeds the limit of {self.max_body_bytes} "
            "(--max-body-bytes): split the request, or stream points to POST .../ingest"
        )
        await error_response(413, "body_too_large", str(exc))(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(
                        f"request body exceeds the limit of {limit} bytes (--max-body-bytes): "
                        "split the request, or stream points to POST .../ingest"
                    )
            return message

        return counted


def _request_id(scope: Scope) -> str:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            try:
                candidate = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _SANE_ID.match(candidate):
                return str(candidate)
            break
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


__all__: list[Any] = ["RequestContextMiddleware"]
