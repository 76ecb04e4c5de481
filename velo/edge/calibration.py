"""Per-row reuse thresholds learned from verified outcomes (in the spirit of vCache,
arXiv 2502.03771, implemented from the paper's idea only).

One global threshold cannot be right for every cached question: "How do I learn Python?" has a
close neighbour that means something else, "What is photosynthesis?" has none. Each cached row
therefore keeps its own threshold on the reuse score (the verifier's P(same), or the cosine
similarity without a verifier), starting at the global one (calibrated for δ) and moved by
what verification observes about that row:

  * a wrong reuse (or a forward whose fresh answer shows the row would have been wrong) at
    score s: the row never again reuses at s or below -> threshold = max(threshold, s + step);
  * a right one at score s below the threshold, with no wrong one at or above s: the row has
    proved itself down to s -> threshold = max(s, highest wrong score + step).

Observations come for free on every forward (the LLM's fresh answer is compared with the
nearest row's answer) and from shadow verification of reuses (SPEC §3), so an edge keeps
getting better without references. The state is a few floats per row; rows the cache evicted
are forgotten with `forget`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowRecord:
    threshold: float
    highest_wrong: float = float("-inf")
    right: int = 0
    wrong: int = 0


class RowCalibration:
    def __init__(self, global_threshold: float, step: float = 0.01,
                 floor: float | None = None) -> None:
        """`floor`: no row reuses below this score however well it did (default: the global
        threshold minus 0.25, so a row's good record can widen its reach only so far)."""
        self.global_threshold = global_threshold  # may move (edged.reuse: the cache's size)
        self.step = step
        self._floor = floor
        self.rows: dict[int, RowRecord] = {}

    @property
    def floor(self) -> float:
        return self.global_threshold - 0.25 if self._floor is None else self._floor

    def threshold(self, row_id: int) -> float:
        record = self.rows.get(row_id)
        return record.threshold if record is not None else self.global_threshold

    def observe(self, row_id: int, score: float, correct: bool) -> None:
        record = self.rows.setdefault(row_id, RowRecord(self.global_threshold))
        if correct:
            record.right += 1
            if score < record.threshold and score > record.highest_wrong:
                record.threshold = max(score, record.highest_wrong + self.step, self.floor)
        else:
            record.wrong += 1
            record.highest_wrong = max(record.highest_wrong, score)
            record.threshold = max(record.threshold, score + self.step)

    def forget(self, row_ids: list[int]) -> None:
        for row_id in row_ids:
            self.rows.pop(row_id, None)
