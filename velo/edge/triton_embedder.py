"""Embeddings from a Triton Inference Server over gRPC (edged `embedder = "triton"`).

The server runs deploy/triton/model_repository/minilm: the same ONNX MiniLM and tokenizer as
the in-process Embedder, so vectors agree (cosine >= 0.999, tests/test_triton.py) and a cache
filled by one path serves the other. Start a server with: python tools/triton_server.py

Imported only when that kind is configured, so edges without tritonclient still work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import numpy as np

from velo.edge.embedder import EmbedderUnavailable

START_HINT = "start it with: python tools/triton_server.py"

try:
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException
except ImportError as exc:  # an edge installed without the edge extra
    raise ImportError("embedder = \"triton\" needs the PyPI package tritonclient "
                      "(pip install -c constraints.txt -e .[edge])") from exc


class TritonEmbedder:
    """Unit vectors from a Triton model taking TEXT (BYTES) rows and returning EMBEDDING (FP32
    [dim]); same interface as velo.edge.embedder.Embedder. Thread-safe: edged's embedding workers
    share one gRPC channel."""

    model_dir = None

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "minilm",
                 timeout_s: float = 10.0) -> None:
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._client = triton_grpc.InferenceServerClient(url)
        # The width (for the vector collection) and the batch limit come from the served
        # model itself: a server that does not answer now fails the edge's start, loudly.
        try:
            if not self._client.is_model_ready(model, client_timeout=timeout_s):
                raise EmbedderUnavailable(
                    f"Triton at {url} is up but model {model!r} is not ready; "
                    f"check the server's log (model repository deploy/triton/model_repository)")
            config = self._client.get_model_config(model, as_json=True,
                                                   client_timeout=timeout_s)["config"]
        except InferenceServerException as exc:
            raise self._unavailable(exc) from exc
        self.dim: int = int(config["output"][0]["dims"][-1])
        # 0 means the model takes no batch dimension; the shipped one takes up to 64 rows.
        self.max_batch = max(1, int(config.get("max_batch_size", 0)))

    def _unavailable(self, exc: InferenceServerException) -> EmbedderUnavailable:
        # Not reachable (or too slow): the server is down; else it answered with an error.
        down = str(exc.status()) in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        advice = (f"is tritonserver running? {START_HINT}" if down
                  else "see the tritonserver log")
        return EmbedderUnavailable(f"Triton embedder at {self.url} (model {self.model!r}) "
                                   f"failed: {str(exc).strip()[:300]}; {advice}")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch: float32 [len(texts), dim], rows of unit L2 norm."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings; use embed_one() for one text")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate([rows for _, rows in self.embed_parts(texts)])

    def embed_parts(self, texts: Sequence[str]) -> Iterable[tuple[Sequence[int], np.ndarray]]:
        """`embed` one request to Triton (`max_batch` texts) at a time, as each returns."""
        for start in range(0, len(texts), self.max_batch):
            chunk = list(texts[start : start + self.max_batch])
            yield range(start, start + len(chunk)), self._infer(chunk)

    def _infer(self, texts: list[str]) -> np.ndarray:
        rows = np.array([t.encode("utf-8") for t in texts], dtype=np.object_).reshape(-1, 1)
        text = triton_grpc.InferInput("TEXT", list(rows.shape), "BYTES")
        text.set_data_from_numpy(rows)
        try:
            result = self._client.infer(
                self.model, [text], outputs=[triton_grpc.InferRequestedOutput("EMBEDDING")],
                client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self._unavailable(exc) from exc
        out: np.ndarray | None = result.as_numpy("EMBEDDING")
        if out is None or out.shape != (len(texts), self.dim):
            raise EmbedderUnavailable(f"Triton model {self.model!r} at {self.url} returned "
                                      f"{None if out is None else out.shape}, expected "
                                      f"{(len(texts), self.dim)}")
        return out.astype(np.float32, copy=False)

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one text: float32 [dim]."""
        return cast(np.ndarray, self.embed([text])[0])

    def check(self) -> str | None:
        """None while the model is ready, else why not (for a health probe)."""
        try:
            if self._client.is_model_ready(self.model, client_timeout=self.timeout_s):
                return None
            return f"Triton at {self.url}: model {self.model!r} is not ready"
        except InferenceServerException as exc:
            return str(self._unavailable(exc))

    def close(self) -> None:
        self._client.close()
