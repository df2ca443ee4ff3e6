"""The encoder of cluster mode: one Serve deployment (stateless, autoscaled) that every router
replica calls, and ``RemoteEncoder``, the ``service.encoder.TextEncoder`` interface over it.

Routers hold no model: a query's text is encoded by one encoder replica (Serve routes to the
least loaded) and the vector travels back through Ray's object store (1.5 KB for 384 floats).
The router's micro-batcher still gathers concurrent queries into one call. Counting tokens
(the OpenAI dialect's usage) runs on the router's own copy of the tokenizer: it is cheap, and
called from the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from service.encoder import TextEncoder

#: TextEncoder methods an encoder replica answers.
METHODS = frozenset({"encode", "encode_tokens"})


class EncoderImpl:
    """What runs in an encoder replica: today's onnxruntime encoder."""

    def __init__(self, model_dir: str, threads: int | None, quantized: bool, providers: list[str] | None) -> None:
        self.encoder = TextEncoder.load(Path(model_dir), threads=threads, quantized=quantized, providers=providers)

    def describe(self) -> dict[str, Any]:
        e = self.encoder
        return {"name": e.name, "dim": e.dim, "provider": e.provider, "fingerprint": e.fingerprint,
                "max_length": e.max_length}

    async def call(self, method: str, texts: list[str], kwargs: dict[str, Any]) -> Any:
        if method not in METHODS:
            raise ValueError(f"not an encoder call: {method!r}")
        return await asyncio.to_thread(getattr(self.encoder, method), texts, **kwargs)


class RemoteEncoder:
    """A ``TextEncoder`` whose work runs on the encoder deployment (``handle``)."""

    #: At start-up, the first encoder replica may still be scheduled and loading its model.
    START_TIMEOUT_S = 600.0

    def __init__(self, handle: Any, model_dir: Path, *, timeout_s: float) -> None:
        self._handle = handle
        self.timeout_s = timeout_s
        about = handle.describe.remote().result(timeout_s=self.START_TIMEOUT_S)
        self.name: str = about["name"]
        self.dim: int = about["dim"]
        self.provider: str = about["provider"]
        self.fingerprint: str = about["fingerprint"]
        self.max_length: int = about["max_length"]
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.no_padding()

    def _call(self, method: str, texts: Sequence[str], **kwargs: Any) -> Any:
        return self._handle.call.remote(method, list(texts), kwargs).result(timeout_s=self.timeout_s)

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        out: np.ndarray = self._call("encode", texts, batch_size=batch_size)
        return out

    def encode_tokens(self, texts: Sequence[str], *, batch_size: int = 32) -> list[np.ndarray]:
        out: list[np.ndarray] = self._call("encode_tokens", texts, batch_size=batch_size)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text after truncation (with [CLS] and [SEP]), as ``TextEncoder``'s."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(texts))]
