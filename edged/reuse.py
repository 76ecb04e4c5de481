"""The reuse guard: an answer is served from the cache only when the verifier says the cached
question means the same as the new one (velo.core.verifier), at a threshold calibrated for the
error bound δ and then learned per row from verification (velo.edge.calibration).

The global threshold follows the cache's size: a bigger cache offers more near-misses, so the
threshold a verifier was calibrated with for δ rises with the cached questions
(velo.core.verifier.OnnxVerifier.threshold_for); the edge counts them at start and every 30 s.

The policy still decides A, B or C (the paper's LRS); the guard only turns an A it does not
trust into a B. Every verification teaches it: a forward compares the fresh answer with the
best row's answer for free, and shadow verification (SPEC §3) checks a share of the reuses
(the same checks give every edge, guarded or not, its running false-hit estimate: counted in
edged.pipeline). The per-row thresholds are saved in the edge's data folder and survive a
restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velo.core.state import QUESTION, CachedRow
from velo.core.verifier import OnnxVerifier, pair_features
from velo.edge.calibration import RowCalibration, RowRecord
from velo.runtime.logs import get_logger

log = get_logger("edged.reuse")


@dataclass(frozen=True)
class ReuseThreshold:
    """Where the guard's global threshold comes from: `at(cached questions)`, a name for what
    it was taken for (per-row thresholds learned under another one start afresh), and the
    largest size it was calibrated for (0: any size)."""

    at: Callable[[int], float]
    basis: str
    calibrated_rows: int = 0

    @classmethod
    def fixed(cls, threshold: float) -> ReuseThreshold:
        return cls(lambda _rows: threshold, f"fixed {threshold}")


@dataclass(frozen=True)
class Candidate:
    row: CachedRow  # the best cached question for this prompt
    score: float  # P(same) from the verifier, or the cosine similarity without one
    threshold: float  # what this row needs to be reused

    @property
    def trusted(self) -> bool:
        return self.score >= self.threshold


class ReuseGuard:
    def __init__(self, verifier: OnnxVerifier | None, threshold: ReuseThreshold,
                 calibrate_rows: bool, right_q: float, path: Path) -> None:
        self.verifier, self.right_q, self.path = verifier, right_q, path
        self.calibrate_rows = calibrate_rows
        self.threshold = threshold
        self.questions = 0  # cached questions the global threshold was taken for
        self._warned_beyond = False
        self.rows = RowCalibration(threshold.at(0))
        self.vetoed = 0  # (verified reuses are counted by the pipeline, guard or not)
        self._load()

    def follow_size(self, questions: int) -> None:
        """Take the global threshold for a cache of `questions` cached questions."""
        before, self.questions = self.rows.global_threshold, questions
        self.rows.global_threshold = self.threshold.at(questions)
        if abs(self.rows.global_threshold - before) >= 0.001:
            log.info("reuse threshold fitted to the cache's size", questions=questions,
                     threshold=round(self.rows.global_threshold, 4), was=round(before, 4))
        beyond = self.threshold.calibrated_rows
        if beyond and questions > beyond and not self._warned_beyond:
            self._warned_beyond = True
            log.warning("the cache holds more questions than the verifier's thresholds were "
                        "calibrated for; the largest size's threshold is kept, and δ is no "
                        "longer guaranteed", questions=questions, calibrated_for=beyond)

    def best(self, prompt: str, rows: tuple[CachedRow, ...]) -> Candidate | None:
        """The cached question most likely to mean the same as `prompt` (None: no question)."""
        questions = [r for r in rows if r.kind == QUESTION]
        if not questions:
            return None
        if self.verifier is None:
            scores = np.array([r.similarity for r in questions])
        else:
            scores = self.verifier.p_same(np.stack(
                [pair_features(prompt, r.question, r.similarity) for r in questions]))
        best = int(np.argmax(scores))
        row = questions[best]
        return Candidate(row, float(scores[best]), self.rows.threshold(row.pair_id))

    def observe(self, candidate: Candidate, q: float) -> None:
        """A verified outcome: q of the candidate's answer against the LLM's fresh answer."""
        if self.calibrate_rows:
            self.rows.observe(candidate.row.pair_id, candidate.score, q >= self.right_q)

    def forget(self, pair_ids: list[int]) -> None:
        """Pairs the cache no longer holds: their per-row thresholds go too (on the event
        loop, as observe runs; edged.server wires VectorCache.pairs_gone here)."""
        self.rows.forget(pair_ids)

    def save(self) -> None:
        """Write the per-row thresholds (atomically: a crash leaves the old file)."""
        if not self.calibrate_rows:
            return
        rows = dict(self.rows.rows)  # a copy (one C call): observe may add rows meanwhile
        data = {"basis": self.threshold.basis,
                "rows": {str(k): [v.threshold, v.highest_wrong, v.right, v.wrong]
                         for k, v in rows.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def _load(self) -> None:
        if not self.calibrate_rows or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("basis") != self.threshold.basis:
                log.info("reuse threshold changed; per-row thresholds start afresh",
                         was=data.get("basis", data.get("global")), now=self.threshold.basis)
                return
            for key, (threshold, highest_wrong, right, wrong) in data["rows"].items():
                self.rows.rows[int(key)] = RowRecord(float(threshold), float(highest_wrong),
                                                     int(right), int(wrong))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged file costs only learning
            log.error("per-row thresholds unreadable; starting afresh", path=str(self.path),
                      error=str(exc))
