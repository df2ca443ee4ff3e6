"""The OpenAI-compatible embeddings API, driven by the official ``openai`` client from PyPI
against a real server on loopback (tests/server.py)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.server import Server

pytestmark = pytest.mark.slow

API_KEY = "openai-compat-key-42"


def client_for(server: Server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_embeddings_match_the_native_encoder(server: Server, client: httpx.Client) -> None:
    oai = client_for(server)
    texts = ["memory-light retrieval", "a second, longer sentence about vector search"]
    as_floats = oai.embeddings.create(model="minilm", input=texts, encoding_format="float")
    as_base64 = oai.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    single = oai.embeddings.create(model="minilm", input=texts[0])
    assert [d.index for d in as_floats.data] == [0, 1] and as_floats.model == "minilm"
    floats = np.array([d.embedding for d in as_floats.data])
    assert floats.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.array([d.embedding for d in as_base64.data]), floats, atol=1e-6)
    np.testing.assert_allclose(single.data[0].embedding, floats[0], atol=1e-6)
    # The same vectors as tandem's own search path: a collection with the encoder finds the text.
    client.put("/collections/openai_oai", json={"encoder": "minilm"})
    client.put("/collections/openai_oai/points", params={"wait": "true"},
               json={"points": [{"id": i, "text": t} for i, t in enumerate(texts)]})
    hits = client.post("/collections/openai_oai/search", json={"vector": floats[1].tolist(), "k": 1}).json()["hits"]
    assert hits[0]["id"] == 1 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # Usage: tokens as the model saw them, [CLS] and [SEP] included.
    assert single.usage.prompt_tokens == single.usage.total_tokens == 6
    assert as_floats.usage.prompt_tokens > single.usage.prompt_tokens
    assert oai.embeddings.create(model="minilm", input=texts[0], dimensions=384).data[0].embedding


def test_models(server: Server) -> None:
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == ["minilm"] and models.data[0].owned_by == "tandem"


@pytest.mark.parametrize(
    ("kwargs", "status", "says"),
    [
        ({"model": "minilm", "input": "x", "dimensions": 128}, 400, "cannot shorten them"),
        ({"model": "minilm", "input": [101, 2023, 102]}, 400, "token ids"),
        ({"model": "minilm", "input": ["ok", "  "]}, 400, "input[1] is empty"),
        ({"model": "minilm", "input": []}, 400, "non-empty list"),
        ({"model": "gpt-4", "input": "x"}, 404, "GET /v1/models"),
        ({"model": "minilm", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_errors_have_openai_shape(server: Server, kwargs: dict[str, Any], status: int, says: str) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        client_for(server).embeddings.create(**kwargs)
    err = raised.value
    assert err.status_code == status
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert says in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


def test_more_inputs_than_allowed(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        client_for(server).embeddings.create(model="minilm", input=["a"] * 2049)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, models_dir: Any) -> Any:
    srv = Server(tmp_path_factory.mktemp("oai") / "data", models_dir, env={"TANDEM_API_KEY": API_KEY}).start()
    yield srv
    srv.stop_cleanly()


def test_api_key(keyed_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        client_for(keyed_server, "wrong-key").embeddings.create(model="minilm", input="x")
    assert raised.value.response.json()["error"]["code"] == "invalid_api_key"
    ok = client_for(keyed_server, API_KEY).embeddings.create(model="minilm", input="x")
    assert len(ok.data[0].embedding) == 384
