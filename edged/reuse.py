"""The reuse guard: an answer is served from the cache only when the verifier says the cached
question means the same as the new one (velo.verifier), at a threshold calibrated for the
error bound δ and then learned per row from verification (velo.calibration).

The policy still decides A, B or C (the paper's LRS); the guard only turns an A it does not
trust into a B. Every verification teaches it: a forward compares the fresh answer with the
best row's answer for free, and shadow verification (SPEC §3) checks a share of the reuses,
which also gives the edge its running false-hit estimate. The per-row thresholds are saved in
the edge's data folder and survive a restart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velo.calibration import RowCalibration, RowRecord
from velo.logs import get_logger
from velo.state import QUESTION, CachedRow
from velo.verifier import OnnxVerifier, pair_features

log = get_logger("edged.reuse")


@dataclass(frozen=True)
class Candidate:
    row: CachedRow  # the best cached question for this prompt
    score: float  # P(same) from the verifier, or the cosine similarity without one
    threshold: float  # what this row needs to be reused

    @property
    def trusted(self) -> bool:
        return self.score >= self.threshold


class ReuseGuard:
    def __init__(self, verifier: OnnxVerifier | None, threshold: float, calibrate_rows: bool,
                 right_q: float, path: Path) -> None:
        self.verifier, self.right_q, self.path = verifier, right_q, path
        self.calibrate_rows = calibrate_rows
        self.rows = RowCalibration(threshold)
        self.vetoed = self.verified = self.judged_wrong = 0
        self._load()

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

    def observe(self, candidate: Candidate, q: float, reused: bool) -> None:
        """A verified outcome: q of the candidate's answer against the LLM's fresh answer."""
        right = q >= self.right_q
        if reused:
            self.verified += 1
            self.judged_wrong += not right
        if self.calibrate_rows:
            self.rows.observe(candidate.row.pair_id, candidate.score, right)

    @property
    def false_hit_estimate(self) -> float:
        return self.judged_wrong / self.verified if self.verified else 0.0

    def save(self) -> None:
        """Write the per-row thresholds (atomically: a crash leaves the old file)."""
        if not self.calibrate_rows:
            return
        data = {"global": self.rows.global_threshold,
                "rows": {str(k): [v.threshold, v.highest_wrong, v.right, v.wrong]
                         for k, v in self.rows.rows.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def _load(self) -> None:
        if not self.calibrate_rows or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data["global"] != self.rows.global_threshold:
                log.info("reuse threshold changed; per-row thresholds start afresh",
                         was=data["global"], now=self.rows.global_threshold)
                return
            for key, (threshold, highest_wrong, right, wrong) in data["rows"].items():
                self.rows.rows[int(key)] = RowRecord(float(threshold), float(highest_wrong),
                                                     int(right), int(wrong))
        except (ValueError, KeyError, TypeError) as exc:  # a damaged file costs only learning
            log.error("per-row thresholds unreadable; starting afresh", path=str(self.path),
                      error=str(exc))
