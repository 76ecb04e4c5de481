"""Loading an ONNX model that came from elsewhere: a policy from trainerd, a verifier file.

One rule for both: one thread (a policy or a verifier is a few small matrix products, and the
edge's threads belong to the embedder), the CPU provider, and a self-contained model.
"""

from __future__ import annotations

import tempfile
from typing import Any


def load_session(model: bytes) -> Any:
    """An onnxruntime InferenceSession of `model`. A model must carry all its weights:
    onnxruntime resolves "external data" weights as files relative to a folder (the working
    directory by default), so it is pointed at an empty one and such a model fails to load
    instead of reading the edge's files. onnxruntime raises several unrelated exception types on
    a bad model; they propagate, and the caller says what could not be loaded."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="velo-model-") as empty:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", empty)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
