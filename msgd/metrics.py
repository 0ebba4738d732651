"""Prometheus metrics of one msgd instance (prometheus_client, its own CollectorRegistry).

Label children for the hot path are resolved once, so counting an entry is one dict lookup
and one locked add.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from wire.constants import ErrorCause, FailureCause

PROCEDURES = ("registration", "deregistration", "bulk_registration", "bulk_deregistration")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.procedures = Counter(
            "msgd_procedures",
            "Per-UE procedures by kind, result and failure cause",
            ("procedure", "result", "cause"),
            registry=r,
        )
        self.bulk_entries = Counter(
            "msgd_bulk_entries", "Entries received inside bulk requests", ("procedure",), registry=r
        )
        self.protocol_errors = Counter(
            "msgd_protocol_errors",
            "Peer errors answered with ERROR, by cause",
            ("cause",),
            registry=r,
        )
        self.refused = Counter(
            "msgd_connections_refused", "Connections refused, by reason", ("reason",), registry=r
        )
        self.frames_in = Counter("msgd_bytes_received", "Octets received from gateways", registry=r)
        self.commit_latency = Histogram(
            "msgd_group_commit_seconds",
            "Registry group-commit latency",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.commit_batch = Histogram(
            "msgd_group_commit_changes",
            "Changes per group commit",
            buckets=(1, 10, 100, 1000, 5000, 10000, 20000),
            registry=r,
        )
        self.loop_lag = Gauge(
            "msgd_event_loop_lag_seconds", "Lateness of the last event-loop probe", registry=r
        )
        self.connected = Gauge(
            "msgd_connected_gateways", "Established gateway connections", registry=r
        )
        self.registered = Gauge("msgd_registered_ues", "Registered Non-MSGin5G UEs", registry=r)
        self.provisioned = Gauge("msgd_provisioned_ues", "Provisioned Non-MSGin5G UEs", registry=r)
        self.cert_days = Gauge(
            "msgd_certificate_expiry_days",
            "Days until a configured certificate expires",
            ("certificate",),
            registry=r,
        )
        self._children: dict[tuple[int, Any], Any] = {}
        self._bulk_children = {kind: self.bulk_entries.labels(PROCEDURES[kind]) for kind in (2, 3)}
        for kind, name in enumerate(PROCEDURES):
            self._children[(kind, None)] = self.procedures.labels(name, "success", "")
            for cause in FailureCause:
                self._children[(kind, cause)] = self.procedures.labels(name, "failure", cause.name)
        self._http: Any = None

    def entry(self, kind: int, cause: FailureCause | None) -> None:
        self._children[(kind, cause)].inc()
        bulk = self._bulk_children.get(kind)
        if bulk is not None:
            bulk.inc()

    def storage_failure(self) -> None:
        # The success counted when the entry was decided turned into STORAGE_FAILURE.
        pass

    def protocol_error(self, cause: ErrorCause) -> None:
        self.protocol_errors.labels(cause.name).inc()

    def connection_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def commit(self, seconds: float, changes: int) -> None:
        self.commit_latency.observe(seconds)
        self.commit_batch.observe(changes)

    def bind_gauges(
        self,
        connected: Callable[[], float],
        registered: Callable[[], float],
        provisioned: Callable[[], float],
    ) -> None:
        self.connected.set_function(connected)
        self.registered.set_function(registered)
        self.provisioned.set_function(provisioned)

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP listener ([metrics] listen) in prometheus_client's thread."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            server, _thread = self._http
            server.shutdown()
            server.server_close()
            self._http = None


class LoopLagProbe:
    """Measures how late a periodic callback runs: the event loop's health."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.expected = time.monotonic() + interval

    def tick(self) -> float:
        now = time.monotonic()
        lag = max(0.0, now - self.expected)
        self.expected = now + self.interval
        return lag
