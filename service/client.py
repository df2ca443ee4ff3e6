"""A small typed client for tandem's own HTTP API, sync (``Client``) and async (``AsyncClient``),
on httpx.

- 429 (overloaded) and 503 (not ready, an encoder loading) are retried with exponential backoff
  (``Retry-After`` when the server sends one), ``retries`` times.
- Any other 4xx raises the library's typed error when the body names one
  (``index.errors.DimensionMismatch``, ``CollectionNotFound``, ``InvalidFilter``...), else
  ``RequestFailed``; both carry ``status`` and the server's ``request_id``.

    from service.client import Client

    with Client("http://localhost:8000", api_key="...") as tandem:
        tandem.create_collection("docs", encoder="minilm")
        tandem.upsert("docs", [{"id": 1, "text": "hello", "payload": {"lang": "en"}}])
        hits = tandem.search("docs", text="greeting", k=5, filter={"must": [{"key": "lang", "match": "en"}]})
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

from index import errors


class RequestFailed(errors.TandemError):
    """The server refused a request and named no library error (or the retries ran out)."""


def _error(response: httpx.Response) -> Exception:
    """The typed error for a refused request."""
    try:
        body = response.json()["error"]
        type_, message, request_id = body["type"], body["message"], body.get("request_id")
    except (ValueError, KeyError, TypeError):
        type_, message, request_id = "http_error", response.text[:500], None
    name = "".join(part.capitalize() for part in str(type_).split("_"))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.TandemError)):
        cls = RequestFailed
    exc = cls(f"{response.status_code} {type_}: {message}")
    exc.status = response.status_code  # type: ignore[attr-defined]  # context for callers
    exc.request_id = request_id  # type: ignore[attr-defined]
    return exc


def _delay(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    after = response.headers.get("retry-after") if response is not None else None
    if after is not None and re.fullmatch(r"\d+(\.\d+)?", after):
        return min(float(after), 30.0)
    return float(backoff * 2**attempt)


def _search_body(text: str | None, vector: Any, k: int, filter: Any, **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"k": k, **{key: v for key, v in options.items() if v is not None}}
    if text is not None:
        body["text"] = text
    if vector is not None:
        body["vector"] = [float(x) for x in vector]
    if filter is not None:
        body["filter"] = filter
    return body


class _Base:
    RETRY = (429, 503)

    def __init__(self, url: str, api_key: str | None, retries: int, backoff: float) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self.backoff = backoff
        self.retried = 0  # requests retried so far (429 and 503)

    @staticmethod
    def _result(response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise _error(response)
        return response.json() if response.content else None


class Client(_Base):
    """Blocking client; a context manager (closes its connection pool)."""

    def __init__(self, url: str = "http://localhost:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.2, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key, retries, backoff)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call, retried on 429 and 503; the decoded JSON answer."""
        for attempt in range(self.retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code not in self.RETRY or attempt == self.retries:
                return self._result(response)
            self.retried += 1
            time.sleep(_delay(response, attempt, self.backoff))
        raise AssertionError("unreachable")

    # -- collections ----------------------------------------------------------------------------
    def create_collection(self, name: str, **config: Any) -> dict[str, Any]:
        return self.request("PUT", f"/collections/{name}", json=config)  # type: ignore[no-any-return]

    def collection(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/collections/{name}")  # type: ignore[no-any-return]

    def collections(self) -> list[dict[str, Any]]:
        return self.request("GET", "/collections")["collections"]  # type: ignore[no-any-return]

    def drop_collection(self, name: str) -> None:
        self.request("DELETE", f"/collections/{name}")

    # -- points and search ----------------------------------------------------------------------
    def upsert(self, name: str, points: list[dict[str, Any]]) -> int:
        return int(self.request("PUT", f"/collections/{name}/points", json={"points": points})["upserted"])

    def delete(self, name: str, ids: list[Any]) -> int:
        return int(self.request("POST", f"/collections/{name}/points/delete", json={"ids": ids})["deleted"])

    def search(self, name: str, *, text: str | None = None, vector: Any = None, k: int = 10, filter: Any = None,
               **options: Any) -> list[dict[str, Any]]:
        """Hits ``{"id", "score", "payload"}``, best first. ``options``: any field of a search request
        (oversampling, nprobe, target_recall, exact, with_payload, mode, fusion)."""
        body = _search_body(text, vector, k, filter, **options)
        return self.request("POST", f"/collections/{name}/search", json=body)["hits"]  # type: ignore[no-any-return]

    def count(self, name: str, filter: Any = None) -> int:
        return int(self.request("POST", f"/collections/{name}/count", json={"filter": filter})["count"])

    def create_payload_index(self, name: str, key: str, type: str) -> dict[str, Any]:
        return self.request(  # type: ignore[no-any-return]
            "PUT", f"/collections/{name}/index", json={"key": key, "type": type})

    # -- ingestion ------------------------------------------------------------------------------
    def ingest(self, name: str, lines: Iterable[bytes]) -> str:
        """Stream NDJSON lines to an ingestion job; its id. Not retried (the body is a stream)."""
        response = self._http.post(f"/collections/{name}/ingest", content=iter(lines),
                                   headers={"content-type": "application/x-ndjson"})
        return str(self._result(response)["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}")  # type: ignore[no-any-return]

    def follow(self, job_id: str, interval: float = 0.5) -> Iterator[dict[str, Any]]:
        """The job's state every ``interval`` seconds until it ends (the last one included)."""
        while True:
            state = self.job(job_id)
            yield state
            if state["state"] != "running":
                return
            time.sleep(interval)


class AsyncClient(_Base):
    """The same calls, awaited; an async context manager."""

    def __init__(self, url: str = "http://localhost:8000", *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 0.2, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, retries, backoff)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code not in self.RETRY or attempt == self.retries:
                return self._result(response)
            self.retried += 1
            await asyncio.sleep(_delay(response, attempt, self.backoff))
        raise AssertionError("unreachable")

    async def create_collection(self, name: str, **config: Any) -> dict[str, Any]:
        return await self.request("PUT", f"/collections/{name}", json=config)  # type: ignore[no-any-return]

    async def collections(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/collections"))["collections"]  # type: ignore[no-any-return]

    async def upsert(self, name: str, points: list[dict[str, Any]]) -> int:
        return int((await self.request("PUT", f"/collections/{name}/points", json={"points": points}))["upserted"])

    async def search(self, name: str, *, text: str | None = None, vector: Any = None, k: int = 10,
                     filter: Any = None, **options: Any) -> list[dict[str, Any]]:
        body = _search_body(text, vector, k, filter, **options)
        return (await self.request("POST", f"/collections/{name}/search", json=body))["hits"]  # type: ignore[no-any-return]

    async def count(self, name: str, filter: Any = None) -> int:
        return int((await self.request("POST", f"/collections/{name}/count", json={"filter": filter}))["count"])

    async def follow(self, job_id: str, interval: float = 0.5) -> AsyncIterator[dict[str, Any]]:
        while True:
            state = await self.request("GET", f"/jobs/{job_id}")
            yield state
            if state["state"] != "running":
                return
            await asyncio.sleep(interval)
