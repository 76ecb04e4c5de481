"""The verifier of reuse: does a cached question mean the same as the new one?

The paper's state (c^s, c^k, c^r of the top-P rows) cannot tell "How do I learn Python?" from
"How do I learn Java?": both are near and look alike to it. The verifier looks at the pair
itself. `pair_features` turns (new question, cached question, their similarity) into a few
numbers, the same on the edge and in the lab; a small ONNX model trained in the lab
(lab.verifier) maps them to P(same meaning). Edges run it with onnxruntime, no PyTorch.

ONNX contract (exported by lab.verifier):
  input   features [B, K] float32   K = len(FEATURES), in that order
  output  p_same   [B]    float32   probability that reusing the cached answer is right
  metadata  velo.verifier.features: the comma-joined FEATURES names it was trained on
            velo.verifier.thresholds: JSON {δ: threshold} calibrated on held-out pairs
"""

from __future__ import annotations

import functools
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velo.state import CachedRow

# Lower-case words, and numbers with their decimals ("3.5", "2024") as one token.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+", re.UNICODE)
_NEGATIONS = frozenset({"not", "no", "never", "without", "nor", "cannot", "cant", "dont",
                        "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "wont"})
_STOP = frozenset({
    "a", "an", "the", "of", "to", "in", "on", "at", "for", "and", "or", "is", "are", "was",
    "were", "be", "been", "do", "does", "did", "i", "you", "he", "she", "it", "we", "they",
    "me", "my", "your", "what", "which", "who", "whom", "how", "why", "when", "where",
    "can", "could", "should", "would", "will", "shall", "may", "might", "must", "there",
    "this", "that", "these", "those", "with", "by", "from", "as", "about", "into", "than",
    "then", "so", "if", "any", "some", "one", "best", "way", "ways", "get",
})
FEATURES = (
    "similarity",        # c^s = 1 - J/2 of the pair (cosine of the unit embeddings)
    "similarity_sq",     # lets a linear layer bend the similarity curve
    "word_jaccard",      # shared words / all words
    "content_jaccard",   # the same on content words (no stop words)
    "new_only",          # share of the new question's content words missing from the cached one
    "cached_only",       # and the other way round
    "trigram_jaccard",   # character 3-grams: spelling variants and inflections
    "numbers_differ",    # both mention numbers and the numbers differ
    "numbers_one_side",  # only one side mentions a number
    "negation_differs",  # one side is negated, the other is not
    "wh_differs",        # the question words differ (how / what / why / when / where / who)
    "length_ratio",      # shorter / longer, in words
    "exact",             # the same text once case, spaces and punctuation are ignored
)
_WH_SET = frozenset({"how", "what", "why", "when", "where", "who", "which"})


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("n't", " not").replace("'", ""))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _trigrams(text: str) -> set[str]:
    s = " ".join(tokens(text))
    return {s[i:i + 3] for i in range(max(len(s) - 2, 1))}


@dataclass(frozen=True)
class _Side:
    """What the features need of one text, computed once per text (cached: the same cached
    questions come back in search after search)."""

    length: int
    words: frozenset[str]
    content: frozenset[str]
    numbers: frozenset[str]
    wh: frozenset[str]
    negated: bool
    trigrams: frozenset[str]
    normal: tuple[str, ...]


@functools.lru_cache(maxsize=16384)
def _side(text: str) -> _Side:
    t = tokens(text)
    words = frozenset(t)
    return _Side(len(t), words, words - _STOP, frozenset(w for w in words if w[0].isdigit()),
                 words & _WH_SET, bool(words & _NEGATIONS), frozenset(_trigrams(text)), tuple(t))


def pair_features(new: str, cached: str, similarity: float) -> np.ndarray:
    """The verifier's input for one (new question, cached question) pair: [len(FEATURES)]."""
    n, c = _side(new), _side(cached)
    return np.array([
        similarity,
        similarity * similarity,
        _jaccard(n.words, c.words),
        _jaccard(n.content, c.content),
        len(n.content - c.content) / len(n.content) if n.content else 0.0,
        len(c.content - n.content) / len(c.content) if c.content else 0.0,
        _jaccard(n.trigrams, c.trigrams),
        float(bool(n.numbers) and bool(c.numbers) and n.numbers != c.numbers),
        float(bool(n.numbers) != bool(c.numbers)),
        float(n.negated != c.negated),
        float(bool(n.wh) and bool(c.wh) and n.wh != c.wh),
        min(n.length, c.length) / max(n.length, c.length, 1),
        float(n.normal == c.normal),
    ], dtype=np.float32)


class VerifierError(Exception):
    """A verifier file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Verdict:
    p_same: float  # the verifier's probability that the reuse is right
    threshold: float  # the reuse threshold in force for this row (per-row when calibrated)

    @property
    def reuse_ok(self) -> bool:
        return self.p_same >= self.threshold


class OnnxVerifier:
    """The exported verifier, run by onnxruntime on one thread (~20 µs a pair)."""

    def __init__(self, model: bytes | Path) -> None:
        import onnxruntime as ort

        data = Path(model).read_bytes() if isinstance(model, Path) else model
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        try:
            # A model must be self-contained, as a policy must (velo.policy): external-data
            # weights resolve against an empty folder, never the working directory.
            with tempfile.TemporaryDirectory(prefix="velo-verifier-") as empty:
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", empty)
                self._session = ort.InferenceSession(data, opts,
                                                     providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise VerifierError(f"not a usable verifier model: {str(exc)[:300]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        names = tuple(meta.get("velo.verifier.features", "").split(","))
        if names != FEATURES:
            raise VerifierError(
                f"verifier was trained on features {names}, this VELO computes {FEATURES}; "
                "retrain it with `velo verifier train`")
        self.name = meta.get("velo.verifier.name", "verifier")
        # δ -> threshold, calibrated by `velo experiment --pairs` on its calibration split.
        self.thresholds = {float(k): float(v) for k, v in
                           json.loads(meta.get("velo.verifier.thresholds", "{}")).items()}

    def threshold_for(self, delta: float) -> float:
        for known, threshold in self.thresholds.items():
            if abs(known - delta) < 1e-9:
                return threshold
        raise VerifierError(
            f"this verifier was not calibrated for delta = {delta} (it was for "
            f"{sorted(self.thresholds) or 'nothing'}); set [reuse] threshold or another delta")

    def p_same(self, features: np.ndarray) -> np.ndarray:
        """P(same meaning) for a batch of pair features [B, K] -> [B]."""
        (out,) = self._session.run(None, {"features": np.asarray(features, np.float32)})
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def scorer_for(self, text: str) -> Callable[[tuple[CachedRow, ...]], np.ndarray]:
        """P(same) of each cached row for the request `text`: the `verified` state's first row
        (velo.state.build_state)."""
        def verify(rows: tuple[CachedRow, ...]) -> np.ndarray:
            return self.p_same(np.stack([pair_features(text, r.question, r.similarity)
                                         for r in rows]))
        return verify

    def score(self, new: str, cached: str, similarity: float) -> float:
        return float(self.p_same(pair_features(new, cached, similarity)[None])[0])
