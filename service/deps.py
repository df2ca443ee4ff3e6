"""Shared dependencies of the routes, as `Annotated[..., Depends(...)]` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import Unauthorized
from service.registry import NAME_PATTERN, OpenCollection, check_name
from service.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="the server's API key (TANDEM_API_KEY)")


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_ready_runtime(request: Request) -> Runtime:
    runtime = get_runtime(request)
    runtime.require_ready()
    return runtime


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """401 unless the bearer token equals TANDEM_API_KEY (compared in constant time)."""
    key = get_runtime(request).settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized(
            "missing or wrong API key: send 'Authorization: Bearer <key>'"
            if given else "this server needs an API key: send 'Authorization: Bearer <key>'"
        )


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ReadyRuntime = Annotated[Runtime, Depends(get_ready_runtime)]
CollectionName = Annotated[
    str, Path(description="1-64 letters, digits, '_' or '-', starting with a letter or digit",
              examples=["docs"], json_schema_extra={"pattern": NAME_PATTERN})
]


def get_collection(name: CollectionName, runtime: ReadyRuntime) -> OpenCollection:
    return runtime.registry.get(check_name(name))


CollectionDep = Annotated[OpenCollection, Depends(get_collection)]
