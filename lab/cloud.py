"""The cloud LLM as a shared, finite resource, for the simulator (lab.sim).

- `slots` requests run at once (a vLLM batch); the others wait in one FIFO queue, whichever
  edge sent them, so one edge's forwards delay every other edge's.
- A request's service time is drawn from measured end-to-end latencies (llmperf); it does not
  depend on how many others run beside it (a simplification: in vLLM a fuller batch is
  somewhat slower per request, which would only steepen the effect of load).
- Requests reach the edges at the times of the Azure LLM conversation trace (one hour of real
  arrivals, bursty: the count per 10 s varies by 27 %), its gaps scaled to the arrival rate
  the simulator asks for (lab.sim.SimConfig.utilisation says how it is chosen).
- What an edge sees (velo.core.load): the cloud's estimated wait from its queue, exactly as cloudd
  computes and reports it, and its own recent forward latency, updated when an answer of its
  comes back (not when it was sent).

utilisation 0 is the unloaded cloud of the paper's simulation: no queue, every delay a fresh
draw of the latencies.
"""

from __future__ import annotations

import csv
import heapq
from datetime import datetime
from pathlib import Path

import numpy as np

from velo.core.load import RunningMean, estimated_wait


def trace_gaps(path: Path) -> np.ndarray:
    """The gaps between consecutive arrivals of an Azure LLM trace (TIMESTAMP column), in s."""
    with open(path, newline="") as f:
        stamps = [datetime.fromisoformat(row["TIMESTAMP"][:26]) for row in csv.DictReader(f)]
    if len(stamps) < 2:
        raise ValueError(f"{path}: fewer than 2 arrivals")
    seconds = np.array([(s - stamps[0]).total_seconds() for s in stamps])
    return np.diff(np.sort(seconds))


class Arrivals:
    """Arrival times from the trace's gaps, scaled to `rate` requests per second, starting at a
    random place of the trace (cycled) per episode."""

    def __init__(self, gaps: np.ndarray, rate: float) -> None:
        self.gaps = gaps * (1.0 / gaps.mean()) / rate if rate > 0 else None
        self.index, self.now, self.count = 0, 0.0, 0

    def reset(self, rng: np.random.Generator) -> None:
        self.now, self.count = 0.0, 0
        self.index = int(rng.integers(len(self.gaps))) if self.gaps is not None else 0

    def next(self) -> float:
        """The time of the next request; without a rate, one hour after the previous one
        (every request finds the cloud idle)."""
        if self.gaps is None:
            self.now += 3600.0
        else:
            self.now += float(self.gaps[self.index % len(self.gaps)])
            self.index += 1
        self.count += 1
        return self.now


class SharedCloud:
    """`slots` LLM slots and one FIFO queue. Requests must be submitted in time order (the
    simulator's clock only moves forward), which makes the heap of slot-free times exact."""

    def __init__(self, slots: int, mean_service_s: float) -> None:
        if slots < 1:
            raise ValueError(f"the cloud needs at least 1 slot, not {slots}")
        self.slots, self.mean_service_s = slots, mean_service_s
        self.reset()

    def reset(self) -> None:
        self.free_at = [0.0] * self.slots  # heap: when each slot finishes its last request
        self.jobs: list[tuple[float, float]] = []  # (start, end) of requests not yet done
        self.requests, self.busy_s = 0, 0.0  # submitted so far, and their service time

    def copy(self) -> SharedCloud:
        twin = SharedCloud.__new__(SharedCloud)
        twin.slots, twin.mean_service_s = self.slots, self.mean_service_s
        twin.free_at, twin.jobs = list(self.free_at), list(self.jobs)
        twin.requests, twin.busy_s = self.requests, self.busy_s
        return twin

    def wait_at(self, t: float) -> float:
        """How long a request sent at `t` would wait for a slot (the hindsight truth)."""
        return max(0.0, self.free_at[0] - t)

    def submit(self, t: float, service_s: float) -> float:
        """Queue a request at `t`; its wait for a slot."""
        start = max(t, heapq.heappop(self.free_at))
        heapq.heappush(self.free_at, start + service_s)
        self.jobs.append((start, start + service_s))
        self.requests += 1
        self.busy_s += service_s
        return start - t

    def estimated_wait(self, t: float) -> float:
        """What cloudd reports at `t` (velo.core.load.estimated_wait of its queue)."""
        self.jobs = [j for j in self.jobs if j[1] > t]
        in_flight = sum(start <= t for start, _ in self.jobs)
        return estimated_wait(in_flight, len(self.jobs) - in_flight, self.slots,
                              self.mean_service_s)


class EdgeLink:
    """One edge's view of its own forwards: forward_s counts an answer once it has come back."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latency = RunningMean()
        self.pending: list[tuple[float, float]] = []  # heap of (answer time, delay)

    def sent(self, t: float, delay_s: float) -> None:
        heapq.heappush(self.pending, (t + delay_s, delay_s))

    def forward_s(self, t: float) -> float:
        while self.pending and self.pending[0][0] <= t:
            self.latency.add(heapq.heappop(self.pending)[1])
        return self.latency.value
