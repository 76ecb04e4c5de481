"""Prometheus metrics of a daemon, served on its own port (`metrics_listen` in each daemon's
config; off when empty).

Each daemon has its own registry (tests run several daemons in one process). Two kinds of
metric live here: events counted as they happen (requests by action and status, stage
latencies, similarities), and values the daemon already keeps (cache rows, spool, policy
version...) read when Prometheus scrapes, through `Metrics.read`, so that nothing is counted
twice and a scrape always agrees with GetStats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from velo.runtime.logs import get_logger
from velo.runtime.security import TLSConfig

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer  # what start_http_server returns

log = get_logger("velo.metrics")
# Stage latencies: from a cached reuse (~ms) to a long LLM answer (~minute).
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 120.0)


@dataclass
class Reading:
    """One value read at scrape time: a gauge, or a counter the daemon keeps itself."""

    name: str
    help: str
    value: float
    counter: bool = False
    labels: dict[str, str] = field(default_factory=dict)


class _Reader(Collector):
    def __init__(self, read: Callable[[], Iterable[Reading]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        try:
            readings = list(self._read())
        except Exception as exc:  # a scrape must never take the daemon down
            log.warning("metrics read failed", error=str(exc))
            return []
        for r in readings:
            family = families.get(r.name)
            if family is None:
                kind = CounterMetricFamily if r.counter else GaugeMetricFamily
                family = families[r.name] = kind(r.name, r.help, labels=sorted(r.labels))
            family.add_metric([r.labels[k] for k in sorted(r.labels)], r.value)
        return list(families.values())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, help, labels, registry=self.registry)

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = SECONDS) -> Histogram:
        return Histogram(name, help, labels, buckets=buckets, registry=self.registry)

    def read(self, read: Callable[[], Iterable[Reading]]) -> None:
        """Values `read` returns are exported at every scrape (it runs on the scrape thread:
        it must only read)."""
        self.registry.register(_Reader(read))

    def start(self, listen: str, tls: TLSConfig | None = None) -> int:
        """Serve /metrics on `listen` (host:port, port 0: any); returns the port."""
        host, _, port = listen.rpartition(":")
        options: dict[str, Any] = {}
        if tls is not None and tls.cert_file:
            options = {"certfile": tls.cert_file, "keyfile": tls.key_file}
        try:
            self._server, _ = start_http_server(int(port), host.strip("[]") or "127.0.0.1",
                                                registry=self.registry, **options)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot serve metrics on {listen}: {exc}") from None
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
