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
            velo.verifier.thresholds: JSON {δ: [[cached rows, threshold], ...]} calibrated on
            held-out pairs among other real questions (lab.verifier.thresholds_by_rows); a
            bigger cache offers more near-misses, so the threshold rises with the rows
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velo.core.onnx import load_session
from velo.core.state import CachedRow

# Lower-case words, and numbers with their decimals ("3.5", "2024") as one token.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+", re.UNICODE)
# "don't" is read as "do not" (tokens), so the contractions arrive as "not".
_NEGATIONS = frozenset({"not", "no", "never", "without", "nor", "neither", "none", "nobody",
                        "nothing", "nowhere", "cannot", "cant", "dont", "doesnt", "didnt",
                        "isnt", "arent", "wasnt", "werent", "wont"})
# Negating prefixes and opposed prefix / suffix pairs ("important" / "unimportant", "enable" /
# "disable", "increase" / "decrease", "careful" / "careless"): what WordNet's antonym list misses
# of the words a product names ("uninstall", "unsubscribe", "decrypt").
# prefix -> the shortest word it negates ("in" + "form" is no negation, "in" + "secure" is).
_NEGATING_PREFIXES = {"un": 4, "dis": 4, "non": 4, "mis": 4, "anti": 4, "in": 5, "im": 5,
                      "ir": 5, "il": 5, "de": 5}
_OPPOSED_PREFIXES = (("en", "dis"), ("in", "de"), ("in", "ex"), ("im", "ex"), ("up", "down"),
                     ("over", "under"), ("max", "min"), ("en", "de"))
_OPPOSED_SUFFIXES = (("ful", "less"),)
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
    "negation_differs",  # the sides hold an odd number of negation words between them
    "antonym",           # a word of one side only is opposed to a word of the other side only
    "words_changed",     # words in one side only, both ways, / 8, capped at 1: a near-copy
    "synonym_swaps",     # share of the words of one side only that a synonym on the other side
                         # replaces (WordNet): "situated" / "located" keeps the meaning,
                         # "CEO" / "janitor" does not
    "wh_differs",        # the question words differ (how / what / why / when / where / who)
    "length_ratio",      # shorter / longer, in words
    "length",            # the longer side's words / 40, capped at 1: one changed word in a long
                         # statement is an edit of its facts more often than a rewording
    "exact",             # the same text once case, spaces and punctuation are ignored
)
_EXACT = FEATURES.index("exact")
_WH_SET = frozenset({"how", "what", "why", "when", "where", "who", "which"})


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("n't", " not").replace("'", ""))


_SUFFIXES = (("iest", "y"), ("ies", "y"), ("ied", "y"), ("ier", "y"), ("ily", "y"),
             ("ing", ""), ("est", ""), ("ed", ""), ("er", ""), ("es", ""), ("ly", ""), ("s", ""))


def stem(word: str) -> str:
    """A crude, consistent stem ("increases", "increased", "increase" -> "increas"; "easier" ->
    "easy"; "bigger" -> "big"): the antonym lexicon is stored stemmed the same way."""
    for suffix, replacement in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + replacement
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2]:
        word = word[:-1]
    return word


def _lexicon(name: str) -> list[list[str]]:
    """The word lines of a lexicon file next to this module (tools/build_antonyms.py writes
    them from WordNet), comments left out. A missing file is an empty lexicon."""
    path = Path(__file__).with_name(name)
    lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else []
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


def _antonyms_by_word() -> dict[str, frozenset[str]]:
    """velo/core/antonyms.txt (WordNet's antonyms, stemmed) plus the opposed function words WordNet
    does not pair: stem -> the stems opposed to it, both ways."""
    pairs = [p for p in _lexicon("antonyms.txt") if len(p) == 2]
    pairs += [[stem(a), stem(b)] for a, b in _FUNCTION_ANTONYMS]
    opposed: dict[str, set[str]] = {}
    for a, b in pairs:
        opposed.setdefault(a, set()).add(b)
        opposed.setdefault(b, set()).add(a)
    return {word: frozenset(others) for word, others in opposed.items()}


# Opposed words that WordNet lists as no antonym pair, or that are stop words elsewhere here.
_FUNCTION_ANTONYMS = (
    ("in", "out"), ("in", "outside"), ("inside", "outside"), ("with", "without"),
    ("for", "against"), ("favour", "against"), ("favor", "against"), ("before", "after"),
    ("above", "below"), ("over", "under"), ("up", "down"), ("on", "off"), ("always", "never"),
    ("all", "none"), ("everyone", "nobody"), ("everything", "nothing"), ("more", "less"),
    ("more", "fewer"), ("most", "least"), ("max", "min"), ("maximum", "minimum"),
    ("first", "last"), ("yes", "no"), ("true", "false"), ("can", "cannot"), ("to", "from"),
    ("enable", "disable"), ("allow", "deny"), ("allow", "block"), ("allow", "forbid"),
    ("accept", "reject"), ("include", "exclude"), ("import", "export"), ("add", "remove"),
    ("add", "delete"), ("increase", "reduce"), ("increase", "lower"), ("raise", "lower"),
    ("upload", "download"), ("login", "logout"), ("install", "uninstall"),
    ("encrypt", "decrypt"), ("connect", "disconnect"), ("start", "stop"), ("start", "end"),
    ("begin", "end"), ("open", "close"), ("lock", "unlock"), ("show", "hide"),
    ("pros", "cons"), ("success", "failure"), ("succeed", "fail"), ("pass", "fail"),
    ("win", "lose"), ("gain", "lose"), ("buy", "sell"), ("cheap", "expensive"),
    ("safe", "dangerous"), ("safe", "unsafe"), ("legal", "illegal"), ("possible", "impossible"),
    ("increase", "decrease"), ("rise", "fall"), ("easier", "harder"), ("easy", "hard"),
    ("early", "late"), ("fast", "slow"), ("faster", "slower"), ("best", "worst"),
    ("better", "worse"), ("good", "bad"), ("love", "hate"), ("like", "dislike"),
    ("agree", "disagree"), ("support", "oppose"), ("same", "different"), ("only", "also"),
    ("public", "private"), ("internal", "external"), ("input", "output"), ("push", "pull"),
    ("send", "receive"), ("client", "server"), ("past", "future"), ("old", "new"),
    ("north", "south"), ("east", "west"), ("left", "right"), ("male", "female"),
    ("men", "women"), ("boy", "girl"), ("day", "night"), ("hot", "cold"), ("high", "low"),
    ("higher", "lower"), ("long", "short"), ("big", "small"), ("large", "small"),
    ("many", "few"), ("rich", "poor"), ("strong", "weak"), ("heavy", "light"),
    ("dark", "light"), ("wet", "dry"), ("full", "empty"), ("alive", "dead"),
    ("inner", "outer"), ("entrance", "exit"), ("enter", "exit"),
)
_ANTONYMS_OF = _antonyms_by_word()


@functools.lru_cache(maxsize=65536)
def _opposites(word: str) -> frozenset[str]:
    """What negates `word`, as raw words and as stems: the lexicon's antonyms of its stem, the
    word with a negating prefix added or taken off ("important" / "unimportant"), and opposed
    affixes swapped ("enable" / "disable", "careful" / "careless")."""
    forms = set(_ANTONYMS_OF.get(stem(word), ()))
    for prefix, shortest in _NEGATING_PREFIXES.items():
        if len(word) >= shortest:
            forms.add(prefix + word)
        if word.startswith(prefix) and len(word) - len(prefix) >= shortest:
            forms.add(word[len(prefix):])
    for p, q in _OPPOSED_PREFIXES:
        for a, b in ((p, q), (q, p)):
            if word.startswith(a) and len(word) - len(a) >= 3:
                forms.add(b + word[len(a):])
    for p, q in _OPPOSED_SUFFIXES:
        for a, b in ((p, q), (q, p)):
            if word.endswith(a) and len(word) - len(a) >= 3:
                forms.add(word[: -len(a)] + b)
    forms.discard(word)
    return frozenset(forms)


def _synonym_sets() -> dict[str, frozenset[int]]:
    """velo/core/synonyms.txt (WordNet synsets, stemmed): stem -> the synsets it belongs to."""
    groups: dict[str, set[int]] = {}
    for number, words in enumerate(_lexicon("synonyms.txt")):
        for word in words:
            groups.setdefault(word, set()).add(number)
    return {word: frozenset(ids) for word, ids in groups.items()}


_SYNONYMS = _synonym_sets()


@functools.lru_cache(maxsize=65536)
def _synsets(word: str) -> frozenset[int]:
    return _SYNONYMS.get(stem(word), frozenset())


def _synonym_swaps(new_only: frozenset[str], cached_only: frozenset[str]) -> float:
    if not new_only and not cached_only:
        return 0.0
    new_sets = [_synsets(w) for w in new_only]
    cached_sets = [_synsets(w) for w in cached_only]
    new_all = frozenset().union(*new_sets)
    cached_all = frozenset().union(*cached_sets)
    replaced = sum(bool(s & cached_all) for s in new_sets) \
        + sum(bool(s & new_all) for s in cached_sets)
    return replaced / (len(new_sets) + len(cached_sets))


def _antonym_across(new_only: frozenset[str], cached_only: frozenset[str]) -> bool:
    if not new_only or not cached_only:
        return False
    other = cached_only | {stem(w) for w in cached_only}
    return any(_opposites(w) & other for w in new_only)


def content_stems(text: str) -> list[str]:
    """The text's content words (no stop words), stemmed, sorted: equal for two texts that say
    the same words in another order or inflection."""
    return sorted(stem(w) for w in tokens(text) if w not in _STOP)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
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
    negations: int
    trigrams: frozenset[str]
    normal: tuple[str, ...]


@functools.lru_cache(maxsize=16384)
def _side(text: str) -> _Side:
    t = tokens(text)
    words = frozenset(t)
    return _Side(len(t), words, words - _STOP, frozenset(w for w in words if w[0].isdigit()),
                 words & _WH_SET, sum(w in _NEGATIONS for w in t), frozenset(_trigrams(text)),
                 tuple(t))


def same_question(new: str, cached: str) -> bool:
    """An exact repeat: the same words, case, spaces and punctuation aside (the `exact`
    feature). Its cached answer answers it, whatever a pair file's labels say: a benchmark
    that caches another pair's identical question must count serving it right."""
    return tokens(new) == tokens(cached)


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
        float((n.negations - c.negations) % 2 != 0),
        float(_antonym_across(n.words - c.words, c.words - n.words)),
        min(len(n.words ^ c.words) / 8, 1.0),
        _synonym_swaps(n.content - c.content, c.content - n.content),
        float(bool(n.wh) and bool(c.wh) and n.wh != c.wh),
        min(n.length, c.length) / max(n.length, c.length, 1),
        min(max(n.length, c.length) / 40, 1.0),
        float(n.normal == c.normal),
    ], dtype=np.float32)


def _interpolate(points: list[tuple[int, float]], rows: int) -> float:
    if rows <= points[0][0] or len(points) == 1:
        return points[0][1]
    for (r0, t0), (r1, t1) in itertools.pairwise(points):
        if rows <= r1:
            share = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return t0 + share * (t1 - t0)
    return points[-1][1]


class VerifierError(Exception):
    """A verifier file that cannot be used; the message says why."""


class OnnxVerifier:
    """The exported verifier, run by onnxruntime on one thread (~20 µs a pair)."""

    def __init__(self, model: bytes | Path) -> None:
        data = Path(model).read_bytes() if isinstance(model, Path) else model
        try:
            self._session = load_session(data)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise VerifierError(f"not a usable verifier model: {str(exc)[:300]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        names = tuple(meta.get("velo.verifier.features", "").split(","))
        if names != FEATURES:
            raise VerifierError(
                f"verifier was trained on features {names}, this VELO computes {FEATURES}; "
                "retrain it with `velo verifier train`")
        self.name = meta.get("velo.verifier.name", "verifier")
        # δ -> [(rows, threshold)], rows ascending (velo experiment reuse / pairs).
        self.thresholds: dict[float, list[tuple[int, float]]] = {}
        try:
            for key, value in json.loads(meta.get("velo.verifier.thresholds", "{}")).items():
                points = [(1, float(value))] if isinstance(value, int | float) else sorted(
                    (int(rows), float(tau)) for rows, tau in value)
                if points:
                    self.thresholds[float(key)] = points
        except (ValueError, TypeError) as exc:
            raise VerifierError(f"verifier thresholds unreadable: {exc}") from None

    def threshold_for(self, delta: float, rows: int = 0) -> float:
        """The reuse threshold that keeps wrong answers <= δ in a cache of `rows` cached
        questions: interpolated in log(rows) between the calibrated sizes, held at the ends
        (above the largest calibrated size the edge keeps its threshold and says so)."""
        for known, points in self.thresholds.items():
            if abs(known - delta) < 1e-9:
                return _interpolate(points, rows)
        raise VerifierError(
            f"this verifier was not calibrated for delta = {delta} (it was for "
            f"{sorted(self.thresholds) or 'nothing'}); set [reuse] threshold or another delta")

    def calibrated_rows(self, delta: float) -> int:
        """The largest cache size the thresholds for δ were calibrated for."""
        points = self.thresholds.get(min(self.thresholds, key=lambda d: abs(d - delta))) \
            if self.thresholds else None
        return points[-1][0] if points else 0

    def p_same(self, features: np.ndarray) -> np.ndarray:
        """P(same meaning) for a batch of pair features [B, K] -> [B]; 1 for an exact repeat.

        An exact repeat (the same words, case, spaces and punctuation aside) asks the same
        question, and the model cannot be trusted to say so: it met too few in training (28
        of 12,129 labelled pairs), and the shipped one gave an exact repeat 0.44, below
        every reuse threshold, so a guarded edge never served a repeated question."""
        features = np.asarray(features, np.float32)
        (out,) = self._session.run(None, {"features": features})
        p = np.asarray(out, dtype=np.float32).reshape(-1)
        return np.where(features[:, _EXACT] >= 1.0, np.float32(1.0), p)

    def scorer_for(self, text: str) -> Callable[[tuple[CachedRow, ...]], np.ndarray]:
        """P(same) of each cached row for the request `text`: the `verified` state's first row
        (velo.core.state.build_state)."""
        def verify(rows: tuple[CachedRow, ...]) -> np.ndarray:
            return self.p_same(np.stack([pair_features(text, r.question, r.similarity)
                                         for r in rows]))
        return verify

    def score(self, new: str, cached: str, similarity: float) -> float:
        return float(self.p_same(pair_features(new, cached, similarity)[None])[0])
