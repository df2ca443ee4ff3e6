"""The error table and the last-resort 500, in-process (no model needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from index import errors as index_errors
from service import errors
from service.app import create_app
from service.batcher import BatcherClosed, Overloaded
from service.settings import Settings


def test_every_library_error_has_a_status() -> None:
    expected = {
        index_errors.DimensionMismatch: 422, index_errors.InvalidVector: 422, index_errors.InvalidId: 422,
        index_errors.DuplicateId: 422, index_errors.InvalidPayload: 422, index_errors.InvalidFilter: 422,
        index_errors.EmptyBatch: 422, index_errors.InvalidArgument: 422,
        index_errors.CollectionNotFound: 404, index_errors.PointNotFound: 404,
        index_errors.CollectionExists: 409, Overloaded: 429, BatcherClosed: 503,
        errors.BadRequest: 400, errors.Unauthorized: 401, errors.BodyTooLarge: 413,
        errors.BatchTooLarge: 413, errors.NotReady: 503,
    }
    for cls, status in expected.items():
        assert errors.status_of(cls("x")) == status, cls
    # CorruptIndex is the server's problem: a 500 that says nothing about the files.
    assert errors.status_of(index_errors.CorruptIndex("x")) is None
    assert errors.type_name(index_errors.DimensionMismatch("x")) == "dimension_mismatch"


def test_500_never_echoes_internals(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, encoder=None, access_log=False))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    @app.get("/corrupt")
    async def corrupt() -> None:
        raise index_errors.CorruptIndex("vectors.0.f32 is shorter than the catalog says")

    async def call(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get(path, headers={"x-request-id": "req-1"})

    for path in ("/boom", "/corrupt"):
        r = asyncio.run(call(path))
        assert r.status_code == 500
        assert r.headers["x-request-id"] == "req-1"
        err = r.json()["error"]
        assert err["type"] == "internal" and err["request_id"] == "req-1"
        assert "secret" not in r.text and "vectors" not in r.text


def test_settings_validation_names_the_fix(tmp_path: Path) -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="TANDEM_API_KEY"):
        Settings(api_key="short")
    with pytest.raises(ValidationError, match="--search-queue-size"):
        Settings(search_queue_size=4, encode_batch_size=8)
    (tmp_path / "f").write_text("")
    with pytest.raises(ValidationError, match="TANDEM_DATA_DIR"):
        Settings(data_dir=tmp_path / "f")
    assert Settings(encoder="").encoder is None
    assert Settings(api_key="").api_key is None


def test_cli_rejects_bad_settings_without_echoing_the_key(monkeypatch: object, capsys: object) -> None:
    import pytest

    from service.cli import main

    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]  # fixture types
    mp.setenv("TANDEM_API_KEY", "tiny")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]  # CaptureFixture
    assert "TANDEM_API_KEY" in err and "tiny" not in err


def test_cli_fails_clearly_without_a_model(tmp_path: Path, capsys: object) -> None:
    import logging

    from service.cli import main

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:  # serve configures the process's logging; give pytest its handlers back
        assert main(["serve", "--models-dir", str(tmp_path), "--data-dir", str(tmp_path / "d")]) == 2
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("uvicorn.access").disabled = False
    err = capsys.readouterr().err  # type: ignore[attr-defined]  # CaptureFixture
    assert "tandem export-model" in err
