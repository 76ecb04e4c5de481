"""Triton Python-backend model: texts in, all-MiniLM-L6-v2 unit vectors out.

It runs velo.edge.embedder.Embedder itself (imported from this checkout), not a copy: the same
ONNX graph, tokenizer, truncation and padding as edged's in-process embedder, so a vector from
Triton and one from edged agree (tests/test_triton.py: cosine >= 0.999). The graph already
does the mean pooling and L2 normalisation (tools/export_embedder.py).

The backend's Python environment (tools/triton_server.py builds it) needs numpy<2,
onnxruntime and tokenizers; it does not install VELO, so the checkout holding this file (or
VELO_ROOT) is put on sys.path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# <root>/deploy/triton/model_repository/minilm/1/model.py; VELO_ROOT: a repository copied away.
ROOT = Path(os.environ.get("VELO_ROOT") or Path(__file__).resolve().parents[5])
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from velo.edge.embedder import Embedder  # noqa: E402  (needs ROOT on sys.path)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # Empty embedder_dir: Embedder's default (VELO_EMBEDDER_DIR, else <root>/models/...).
        model_dir = Path(params["embedder_dir"]) if params.get("embedder_dir") else None
        self.embedder = Embedder(model_dir, threads=int(params.get("threads") or 1),
                                 model_file=params.get("embedder_file") or "model.onnx")
        width = config["output"][0]["dims"][-1]
        if width != self.embedder.dim:  # a config/model mismatch would fail every request
            raise ValueError(f"config.pbtxt says EMBEDDING is {width} wide; "
                             f"the model gives {self.embedder.dim}")

    def execute(self, requests: list) -> list:
        # The dynamic batcher hands over several requests at once: one embed() call for all
        # of them (it splits them into runs of similar length itself), then split back.
        texts: list[list[str]] = []
        for request in requests:
            column = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            # Invalid UTF-8 from a foreign client is replaced, not fatal to its batch-mates.
            texts.append([t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
                          for t in column])
        try:
            vectors = self.embedder.embed([t for batch in texts for t in batch])
        except Exception as exc:  # every request of the batch is told, the model stays up
            error = pb_utils.TritonError(f"embedding failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for batch in texts:
            out = np.ascontiguousarray(vectors[start : start + len(batch)], dtype=np.float32)
            start += len(batch)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("EMBEDDING", out)]))
        return responses
