"""One framework on top of tandem's compatible APIs: LangChain's ``QdrantVectorStore``
(``langchain-qdrant``) over the Qdrant API, with embeddings from tandem's OpenAI-compatible
``/v1/embeddings``: add texts, search with a filter, delete."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from langchain_core.embeddings import Embeddings
from langchain_qdrant import QdrantVectorStore
from qdrant_client import QdrantClient
from qdrant_client import models as m

from tests.server import Server

pytestmark = pytest.mark.slow


class TandemEmbeddings(Embeddings):
    """LangChain embeddings served by tandem's encoder through the official openai client."""

    def __init__(self, server: Server) -> None:
        self.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [d.embedding for d in self.client.embeddings.create(model="minilm", input=texts).data]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


TEXTS = [
    ("The cat sat on the warm windowsill all afternoon.", {"lang": "en", "topic": "pets"}),
    ("Die Katze schläft auf dem Sofa.", {"lang": "de", "topic": "pets"}),
    ("Interest rates rose again this quarter.", {"lang": "en", "topic": "finance"}),
    ("A kitten chased a ball of yarn across the floor.", {"lang": "en", "topic": "pets"}),
    ("Die Zinsen sind gestiegen.", {"lang": "de", "topic": "finance"}),
]


def test_langchain_qdrant_round_trip(server: Server) -> None:
    client = QdrantClient(url=server.url, prefix="qdrant", prefer_grpc=False, timeout=60)
    client.create_collection("langchain_lc", vectors_config=m.VectorParams(size=384, distance=m.Distance.COSINE))
    store = QdrantVectorStore(client=client, collection_name="langchain_lc", embedding=TandemEmbeddings(server))
    ids = store.add_texts([t for t, _ in TEXTS], metadatas=[meta for _, meta in TEXTS])
    assert len(ids) == len(TEXTS) and client.count("langchain_lc").count == len(TEXTS)

    english = m.Filter(must=[m.FieldCondition(key="metadata.lang", match=m.MatchValue(value="en"))])
    docs = store.similarity_search("a small cat playing", k=2, filter=english)
    assert [d.page_content for d in docs] == [TEXTS[3][0], TEXTS[0][0]]
    assert all(d.metadata["lang"] == "en" for d in docs)
    scored: list[tuple[Any, float]] = store.similarity_search_with_score("money and banks", k=1)
    assert scored[0][0].metadata["topic"] == "finance"

    assert store.delete(ids=[ids[3]])
    assert client.count("langchain_lc").count == len(TEXTS) - 1
    docs = store.similarity_search("a small cat playing", k=1, filter=english)
    assert docs[0].page_content == TEXTS[0][0]
