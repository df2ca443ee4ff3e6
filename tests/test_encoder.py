"""TextEncoder on the real exported model: shapes, truncation at 256, padding, order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.encoder import EncoderNotFound, TextEncoder

pytestmark = pytest.mark.slow

# Cosines from sentence-transformers 6.2 (SentenceTransformer on the packaged weights).
GOLDEN_AB = 0.75534  # "A man is eating food." vs "A man is eating a piece of bread."
GOLDEN_AC = -0.03647  # "A man is eating food." vs "The stock market fell."

# A sentence of 8 word-piece tokens; repeated it makes texts of known token counts.
UNIT = "the quick brown fox jumps over lazy dogs "


@pytest.fixture(scope="module")
def encoder(onnx_model_dir: Path) -> TextEncoder:
    return TextEncoder.load(onnx_model_dir, threads=2)


def test_shape_dtype_norm(encoder: TextEncoder) -> None:
    vecs = encoder.encode(["hello world", "a second, longer sentence about retrieval", "x"])
    assert vecs.shape == (3, 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 384
    assert encoder.name == "minilm"
    assert encoder.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")


def test_empty_batch(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.encode_tokens([]) == []


def test_empty_and_whitespace_texts(encoder: TextEncoder) -> None:
    vecs = encoder.encode(["", "   ", "\n\t"])
    assert np.isfinite(vecs).all()
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # All three tokenize to [CLS] [SEP]: the same input, the same vector.
    np.testing.assert_allclose(vecs[0], vecs[1], atol=1e-6)
    tokens = encoder.encode_tokens(["", "   "])
    assert [t.shape for t in tokens] == [(2, 384), (2, 384)]


def test_golden_similarities(encoder: TextEncoder) -> None:
    # Related sentences score high, unrelated ones low (values from sentence-transformers).
    a, b, c = encoder.encode(
        ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."]
    )
    assert float(a @ b) == pytest.approx(GOLDEN_AB, abs=1e-4)
    assert float(a @ c) == pytest.approx(GOLDEN_AC, abs=1e-4)


def test_truncation_is_256_not_128(encoder: TextEncoder) -> None:
    long_text = UNIT * 40  # 320 tokens before truncation
    assert encoder.count_tokens([long_text]) == [256]
    (tokens,) = encoder.encode_tokens([long_text])
    assert tokens.shape == (256, 384)


def test_tokens_after_130_change_the_embedding(encoder: TextEncoder) -> None:
    head = UNIT * 17  # 136 word pieces, +[CLS]: the change lands after token 130
    a, b = encoder.encode([head + "cats and mice", head + "quantum chromodynamics"])
    assert encoder.count_tokens([head])[0] > 131
    assert float(a @ b) < 0.9999


def test_padding_does_not_change_the_result(encoder: TextEncoder) -> None:
    short = "what is the capital of france?"
    alone = encoder.encode([short])[0]
    padded = encoder.encode([UNIT * 30, short, "tiny"])[1]
    assert float(alone @ padded) >= 0.9999
    (tok_alone,) = encoder.encode_tokens([short])
    tok_batch = encoder.encode_tokens([UNIT * 30, short])[1]
    assert tok_alone.shape == tok_batch.shape
    np.testing.assert_allclose(tok_alone, tok_batch, atol=1e-4)


def test_order_is_restored(encoder: TextEncoder) -> None:
    texts = [UNIT * k for k in (3, 1, 9, 2, 5)] + ["", "zebra"]
    together = encoder.encode(texts, batch_size=2)
    one_by_one = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_encode_tokens_rows_are_normalized(encoder: TextEncoder) -> None:
    texts = ["hello world", UNIT * 2, ""]
    tokens = encoder.encode_tokens(texts)
    assert [t.shape[0] for t in tokens] == encoder.count_tokens(texts)
    for t in tokens:
        assert t.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_max_length_is_capped_by_the_model(onnx_model_dir: Path) -> None:
    enc = TextEncoder.load(onnx_model_dir, threads=1, max_length=512)
    assert enc.max_length == 256
    short = TextEncoder.load(onnx_model_dir, threads=1, max_length=16)
    assert short.count_tokens([UNIT * 10]) == [16]


def test_rejects_a_single_string(encoder: TextEncoder) -> None:
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode("not a list")


def test_missing_model_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(EncoderNotFound, match="tandem export-model"):
        TextEncoder.load(tmp_path / "minilm")
