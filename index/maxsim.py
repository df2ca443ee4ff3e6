"""Chamfer (MaxSim) scores of a query set against many stored vector sets, run by onnxruntime.

Vector sets are stored as float16. numpy has no float16 matrix product and converts float16 to
float32 without SIMD (52 ms for the 72k token vectors of 300 SciFact documents on this
project's machine, more than the product itself): a two-node ONNX graph, ``Cast`` then
``Gemm``, does both in MLAS's vectorised kernels (35 ms for the same, one thread).
``benchmarks/multivector_bench.py`` measures the rerank built on it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

_ONNX_TYPES = {np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float32): TensorProto.FLOAT}


def _graph(dim: int, dtype: np.dtype) -> bytes:
    """``similarity = query @ float32(vectors).T``: ``(m, dim) float32`` x ``(t, dim) dtype``."""
    nodes = [helper.make_node("Gemm", ["query", "vectors32"], ["similarity"], transB=1)]
    if dtype == np.float32:
        nodes[0].input[1] = "vectors"
    else:
        nodes.insert(0, helper.make_node("Cast", ["vectors"], ["vectors32"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "maxsim",
        [
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["m", dim]),
            helper.make_tensor_value_info("vectors", _ONNX_TYPES[dtype], ["t", dim]),
        ],
        [helper.make_tensor_value_info("similarity", TensorProto.FLOAT, ["m", "t"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime releases from 1.15 on read
    serialized: bytes = model.SerializeToString()
    return serialized


class MaxSim:
    """Scores one query set against back-to-back vector sets of one dtype and dimension.

    ``threads``: onnxruntime intra-op threads per product. One, like the coarse stage's faiss
    scans: a service runs many queries at once, and one thread each is the most queries per second.
    """

    def __init__(self, dim: int, dtype: str | np.dtype, *, threads: int = 1) -> None:
        self.dim = dim
        self.dtype = np.dtype(dtype)
        if self.dtype not in _ONNX_TYPES:
            raise ValueError(f"vector sets are stored as float16 or float32, not {self.dtype}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # run() is thread-safe: one session serves every concurrent search.
        self._session = ort.InferenceSession(_graph(dim, self.dtype), options, providers=["CPUExecutionProvider"])

    def scores(self, query: np.ndarray, vectors: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """``sum_q max_p <q, p>`` per set: ``query`` ``(m, dim)``, ``vectors`` the sets back to back
        ``(sum(sizes), dim)`` in this scorer's dtype, every size >= 1. Returns ``(len(sizes),) float32``."""
        if len(sizes) == 0:
            return np.zeros(0, dtype=np.float32)
        similarity = self._session.run(
            None,
            {
                "query": np.ascontiguousarray(query, dtype=np.float32),
                "vectors": np.ascontiguousarray(vectors, dtype=self.dtype),
            },
        )[0]
        starts = np.cumsum(sizes) - sizes
        return np.asarray(np.maximum.reduceat(similarity, starts, axis=1).sum(axis=0), dtype=np.float32)
