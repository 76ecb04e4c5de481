"""What an edge can see of the cloud's load, computed the same way by cloudd, edged and the
simulator (lab.sim), so that a policy trained on simulated load reads the live one.

The load part of a state (the ONNX input `load`, velo.core.state) holds, in this order:
  cloud_wait_s  the wait a new request would have for one of the cloud's LLM slots, as cloudd
                estimates it from its queue (`estimated_wait`) and reports on every answer and
                in its stats; an edge adds the forwards it sent since that report
                (`wait_after`), which the report cannot count yet
  forward_s     the edge's own recent forward latency: a running mean of the delays of its
                last answers from the cloud (0 before the first one)
"""

from __future__ import annotations

import numpy as np

LOAD_FEATURES = ("cloud_wait_s", "forward_s")
SMOOTHING = 0.2  # weight of the newest sample in a running mean (about the last 5 count)


def estimated_wait(in_flight: int, queued: int, slots: int, mean_service_s: float) -> float:
    """The wait of a request arriving now at a FIFO queue in front of `slots` LLM slots: none
    while a slot is free; else its turn comes after `queued + 1` slots free up, and slots free
    up at `slots / mean_service_s` per second."""
    if slots <= 0 or in_flight < slots:
        return 0.0
    return (queued + 1) * mean_service_s / slots


def wait_after(in_flight: int, queued: int, slots: int, mean_service_s: float,
               joined: int) -> float:
    """The estimated wait once `joined` more requests reached the cloud since it counted
    `in_flight` and `queued`: they take free slots first, then queue. An edge's view between
    two reports, so that the first forwards of a burst raise the wait the later ones see
    (in the simulator every edge reads the cloud's queue as it is, lab.cloud)."""
    total = in_flight + queued + max(joined, 0)
    running = min(total, slots)
    return estimated_wait(running, total - running, slots, mean_service_s)


class RunningMean:
    """An exponentially weighted mean that starts at its first sample: an edge's forward_s
    (its own cloud delays, B and C) and cloudd's mean service time."""

    def __init__(self, smoothing: float = SMOOTHING) -> None:
        self.smoothing = smoothing
        self.value = 0.0
        self.samples = 0

    def add(self, delay_s: float) -> None:
        self.value = delay_s if not self.samples else \
            self.value + self.smoothing * (delay_s - self.value)
        self.samples += 1


def load_vector(cloud_wait_s: float, forward_s: float) -> np.ndarray:
    """The `load` input of a state, in LOAD_FEATURES order."""
    return np.array([cloud_wait_s, forward_s], dtype=np.float32)
