"""Sentence embeddings for the edge daemon: onnxruntime + tokenizers, no PyTorch.

The ONNX graph written by tools/export_embedder.py already does mean pooling and L2
normalisation, so this module only tokenises and runs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from velo.models import ModelNotFound, embedder_dir

EXPORT_HINT = "run: python tools/export_embedder.py"


class Embedder:
    """all-MiniLM-L6-v2 as float32 unit vectors (384 wide)."""

    def __init__(
        self, model_dir: Path | None = None, threads: int = 1, max_length: int = 256
    ) -> None:
        model_dir = Path(model_dir) if model_dir is not None else embedder_dir()
        model_path, tokenizer_path = model_dir / "model.onnx", model_dir / "tokenizer.json"
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise ModelNotFound(
                    f"embedder file {path} is missing; {EXPORT_HINT} --out {model_dir}"
                )

        self.model_dir = model_dir
        self.max_length = max_length
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads and truncates to a fixed 128; pad to the longest
        # text of each batch instead (less work) and truncate where the model was trained to.
        self._tokenizer.enable_truncation(max_length=max_length)
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # One request at a time per call: inter-op parallelism only adds idle threads.
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(model_path), opts, providers=providers)
        # Feed only the inputs the graph declares (an export may have dropped token_type_ids).
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name
        self.dim: int = self._read_dim(model_dir)

    def _read_dim(self, model_dir: Path) -> int:
        width = self._session.get_outputs()[0].shape[-1]
        if isinstance(width, int):
            return width
        # A symbolic width in the graph: fall back to the export's metadata.
        meta_path = model_dir / "embedder.json"
        if meta_path.is_file():
            return int(json.loads(meta_path.read_text())["dim"])
        raise ModelNotFound(
            f"cannot tell the embedding width of {model_dir}; {EXPORT_HINT} --force"
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch: float32 [len(texts), dim], rows of unit L2 norm."""
        # A str is a Sequence[str]: embedding it would silently embed each character.
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings; use embed_one() for one text")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(list(texts))
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        feed = {name: np.asarray(columns[name], dtype=np.int64) for name in self._inputs}
        (out,) = self._session.run([self._output], feed)
        return np.asarray(out, dtype=np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one text: float32 [dim]."""
        return self.embed([text])[0]
