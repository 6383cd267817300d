"""
Counters kept as plain ints on the hot path, exposed in Prometheus text by a
collector that reads them at scrape time (prometheus_client's own counters
take a lock per increment, which the broadcast loop cannot afford).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Stats", "render"]


class Stats:
    """Everything /metrics reports, updated by the hub, the bus and the connections."""

    def __init__(self) -> None:
        #: Open connections of every transport (WebSocket and SSE)...
        self.connections = 0
        self.connections_total = 0
        #: ...of which event streams (GET /events).
        self.sse_connections = 0
        self.sse_connections_total = 0
        #: Of the deliveries and slow disconnects below, those of event streams.
        self.sse_deliveries = 0
        self.sse_slow_disconnects = 0
        #: Items queued through POST /publish.
        self.http_publishes = 0
        self.messages_in = 0
        self.messages_moved = 0
        self.skipped_entries = 0
        self.gaps: Counter[str] = Counter()
        self.deliveries = 0
        self.bytes_out = 0
        self.client_publishes = 0
        self.dead_letters = 0
        self.slow_disconnects = 0
        self.errors: Counter[str] = Counter()
        #: Requests the HTTP side refused, by status ("closed": over --max-http-connections, unread).
        self.http_refusals: Counter[str] = Counter()
        self.redis_up = False
        #: Stream time (ms) of the newest message delivered, for lag.
        self.last_offset_ms = 0
        #: Filled at scrape time by the bus: list length and age of its tail.
        self.queue_depth: int | None = None
        self.queue_oldest_age: float | None = None
        self.started = time.time()
        #: Labels put on every line (with --workers: ``worker="N"``, so scrapes tell workers apart).
        self.labels: dict[str, str] = {}

    def delivered(self, count: int, size: int) -> None:
        self.deliveries += count
        self.bytes_out += size


class _StatsCollector(Collector):
    """Reads the plain counters of a L{Stats} at scrape time."""

    def __init__(self, stats: Stats, clock: Callable[[], float]) -> None:
        self._stats = stats
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = self._stats.labels
        for family in self._families():
            if labels:
                family.samples = [s._replace(labels={**labels, **s.labels}) for s in family.samples]
            yield family

    def _families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats
        yield GaugeMetricFamily(
            "pushservice_connections", "Open client connections (every transport)", value=s.connections
        )
        yield CounterMetricFamily(
            "pushservice_connections_accepted", "WebSocket connections accepted", value=s.connections_total
        )
        by_transport = GaugeMetricFamily(
            "pushservice_transport_connections", "Open client connections, by transport", labels=["transport"]
        )
        by_transport.add_metric(["websocket"], s.connections - s.sse_connections)
        by_transport.add_metric(["sse"], s.sse_connections)
        yield by_transport
        accepted = CounterMetricFamily(
            "pushservice_transport_connections_accepted",
            "Client connections accepted, by transport",
            labels=["transport"],
        )
        accepted.add_metric(["websocket"], s.connections_total)
        accepted.add_metric(["sse"], s.sse_connections_total)
        yield accepted
        for name, text, total, sse in (
            ("messages_out", "Messages delivered to connections", s.deliveries, s.sse_deliveries),
            ("slow_disconnects", "Slow clients disconnected", s.slow_disconnects, s.sse_slow_disconnects),
        ):
            family = CounterMetricFamily(f"pushservice_transport_{name}", f"{text}, by transport", labels=["transport"])
            family.add_metric(["websocket"], total - sse)
            family.add_metric(["sse"], sse)
            yield family
        yield CounterMetricFamily("pushservice_messages_in", "Messages read from the log", value=s.messages_in)
        yield CounterMetricFamily(
            "pushservice_messages_moved", "Items this node moved from the list to the log", value=s.messages_moved
        )
        yield CounterMetricFamily(
            "pushservice_log_entries_skipped", "Log entries that could not be delivered", value=s.skipped_entries
        )
        gaps = CounterMetricFamily("pushservice_gaps", "Gaps found in the log, by reason", labels=["reason"])
        for reason in ("trimmed", "reset"):
            gaps.add_metric([reason], s.gaps[reason])
        yield gaps
        yield CounterMetricFamily("pushservice_messages_out", "Messages delivered to connections", value=s.deliveries)
        yield CounterMetricFamily("pushservice_bytes_out", "Bytes of message frames written", value=s.bytes_out)
        yield CounterMetricFamily("pushservice_client_publishes", "Client messages queued", value=s.client_publishes)
        yield CounterMetricFamily(
            "pushservice_http_publishes", "Items queued through POST /publish", value=s.http_publishes
        )
        yield CounterMetricFamily(
            "pushservice_dead_letters", "Items moved to the dead-letter list", value=s.dead_letters
        )
        yield CounterMetricFamily("pushservice_slow_disconnects", "Slow clients disconnected", value=s.slow_disconnects)
        errors = CounterMetricFamily("pushservice_errors", "Error frames sent, by code", labels=["code"])
        for code, n in sorted(s.errors.items()):
            errors.add_metric([code], n)
        yield errors
        refusals = CounterMetricFamily(
            "pushservice_http_refusals", "Requests refused before they were served, by status", labels=["status"]
        )
        for status, n in sorted(s.http_refusals.items()):
            refusals.add_metric([status], n)
        yield refusals
        yield GaugeMetricFamily("pushservice_redis_up", "1 while Redis answers", value=1 if s.redis_up else 0)
        if s.last_offset_ms:
            lag = max(0.0, self._clock() - s.last_offset_ms / 1000)
            yield GaugeMetricFamily("pushservice_log_lag_seconds", "Age of the newest message delivered", value=lag)
        if s.queue_depth is not None:
            yield GaugeMetricFamily("pushservice_queue_depth", "Items waiting on the Redis list", value=s.queue_depth)
        if s.queue_oldest_age is not None:
            yield GaugeMetricFamily(
                "pushservice_queue_oldest_age_seconds",
                "How long the oldest waiting item has waited (approx.)",
                value=s.queue_oldest_age,
            )


def render(stats: Stats, clock: Callable[[], float] = time.time) -> bytes:
    """The Prometheus text exposition of C{stats}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, clock))
    return generate_latest(registry)
