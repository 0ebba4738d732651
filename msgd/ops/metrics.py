"""Prometheus metrics of one msgd instance, and the health probe behind the systemd watchdog.

Metrics live in their own CollectorRegistry and are served by prometheus_client's HTTP
server thread on `[metrics] listen`. Everything is counted on the event-loop thread; gauges
that read daemon state (connections, registrations, certificate expiry) are computed when
scraped, from values the loop thread replaces atomically, so a scrape never races the loop.

Label children for the hot path are resolved once, and the counters of the per-request path
(procedures, bulk entries, messages, frames, octets) are plain ints the loop thread adds to
without a lock, exposed as counters when scraped (`_LoopCounters`; no `_created` samples):
the hooks of one lone single cost 0.73 µs instead of 2.28 with prometheus_client's Counter.
Procedures are counted when their answer is sent, with the cause that was actually sent (a
success decided earlier can still become STORAGE_FAILURE).

The group-commit latency is measured from the server side with the registry's public API:
the transport notes, after each chunk of gateway data, the last change sequence number
submitted and the loop time the chunk arrived (`submitted`); the registry's completion
listener (`settled`) then observes, per committed batch, the time since its oldest change
was submitted. That is the wait a gateway sees for its answer, queueing included.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from msgd.procedures import Procedure
from wire.constants import ErrorCause, FailureCause

if TYPE_CHECKING:
    from msgd.registry.store import Registry

__all__ = ["PROCEDURES", "Metrics", "certificate_inventory"]

PROCEDURES = tuple(procedure.label for procedure in Procedure)
_SECONDS_PER_DAY = 86400.0
# Commit marks kept at most: one per chunk of gateway data with new changes. Far more than
# a group commit ever spans; a bound so a stuck writer cannot grow them without limit.
_MAX_MARKS = 65536


class Metrics:
    """The daemon's metrics; the methods are the hooks the server and transport call."""

    def __init__(self) -> None:
        """Long on purpose: the declaration of every metric, one statement each, so the whole set
        reads as one table."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The counters of the per-request path: plain ints the loop thread adds to, read at
        # scrape (prometheus_client's Counter.inc takes a lock: 314 ns a call against 51).
        loop_counters = _LoopCounters()
        r.register(loop_counters)
        self.procedures = loop_counters.counter(
            "msgd_procedures",
            "Per-UE procedures answered, by kind, result and failure cause",
            ("procedure", "result", "cause"),
        )
        self.bulk_entries = loop_counters.counter(
            "msgd_bulk_entries", "Entries answered inside bulk transactions", ("procedure",))
        self.bulk_transactions = Counter(
            "msgd_bulk_transactions", "Bulk transactions started by gateways", ("procedure",),
            registry=r,
        )
        self.messages = loop_counters.counter(
            "msgd_messages_received",
            "Messages received from gateways, by type (a bulk transaction counts once)",
            ("type",),
        )
        self.protocol_errors = Counter(
            "msgd_protocol_errors",
            "Errors msgd detected in gateways' traffic (answered with ERROR), by cause",
            ("cause",),
            registry=r,
        )
        self.peer_errors = Counter(
            "msgd_peer_errors", "ERROR messages received from gateways, by cause", ("cause",),
            registry=r,
        )
        self.transactions_failed = Counter(
            "msgd_transactions_failed", "Transactions ended by an ERROR, by cause", ("cause",),
            registry=r,
        )
        self.accepted = Counter(
            "msgd_connections_accepted", "Gateway connections whose TLS handshake completed",
            registry=r,
        )
        self.refused = Counter(
            "msgd_connections_refused", "Connections refused, by reason", ("reason",), registry=r
        )
        self.overload_refused = Counter(
            "msgd_overload_refused",
            "New work refused under overload (docs/protocol.md §7): entries answered "
            "SERVER_BUSY, requests ERROR(OVERLOADED), sessions GOODBYE(OVERLOADED)",
            ("what",), registry=r,
        )
        self.overloaded = Gauge(
            "msgd_overloaded", "1 during an overload episode (new work is being refused)",
            registry=r,
        )
        self.overload_episodes = Counter(
            "msgd_overload_episodes", "Overload episodes started", registry=r
        )
        self.goodbyes = Counter(
            "msgd_goodbyes_sent", "GOODBYE messages sent to gateways, by cause", ("cause",),
            registry=r,
        )
        self.frames_received = loop_counters.counter(
            "msgd_frames_received", "Frames received from gateways (a bulk request is many)"
        ).labels()
        self.bytes_in = loop_counters.counter(
            "msgd_received_bytes", "Octets received from gateways").labels()
        self.bytes_out = loop_counters.counter(
            "msgd_sent_bytes", "Octets sent to gateways").labels()
        # Kept under its old attribute name too: nothing else counts received octets.
        self.frames_in = self.bytes_in
        self.commit_latency = Histogram(
            "msgd_group_commit_seconds",
            "Registry group commits: time from the submission of a batch's oldest change "
            "until the batch is durable (or failed)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.commit_batch = Histogram(
            "msgd_group_commit_changes",
            "Changes per group commit",
            buckets=(1, 10, 100, 1000, 5000, 10000, 20000),
            registry=r,
        )
        self.commit_failures = Counter(
            "msgd_registry_commit_failures", "Registry batches that failed to commit", registry=r
        )
        self.loop_lag = Gauge(
            "msgd_event_loop_lag_seconds", "Lateness of the last event-loop probe", registry=r
        )
        self.loop_lag_samples = Histogram(
            "msgd_event_loop_lag_sample_seconds",
            "Lateness of a timer probing the event loop every 100 ms (its p99 is the loop's "
            "responsiveness; the watchdog's once-a-second probe feeds the gauges)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "msgd_event_loop_lag_max_seconds",
            "Largest event-loop probe lateness since the daemon started",
            registry=r,
        )
        self.watchdog_withheld = Counter(
            "msgd_watchdog_withheld",
            "Watchdog pings withheld because the daemon was unhealthy, by reason",
            ("reason",),
            registry=r,
        )
        self.connected = Gauge(
            "msgd_connected_gateways", "Established gateway connections", registry=r
        )
        self.registered = Gauge("msgd_registered_ues", "Registered Non-MSGin5G UEs", registry=r)
        self.provisioned = Gauge("msgd_provisioned_ues", "Provisioned Non-MSGin5G UEs", registry=r)
        self.pending = Gauge(
            "msgd_registry_pending_changes", "Registry changes submitted, not yet durable",
            registry=r,
        )
        self.reloads = Counter(
            "msgd_reloads", "Reloads (SIGHUP or msgctl reload), by result", ("result",), registry=r
        )
        self.reload_ok = Gauge(
            "msgd_config_last_reload_successful", "1 if the last reload succeeded", registry=r
        )
        self.reload_ok.set(1)
        self.reload_time = Gauge(
            "msgd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful reload (or of the start)",
            registry=r,
        )
        self.reload_time.set(time.time())
        self.draining = Gauge(
            "msgd_draining", "1 once msgctl drain stopped accepting gateways", registry=r
        )
        # 0 while a PostgreSQL registry cannot be reached (entries get SERVER_BUSY): the
        # watchdog keeps pinging then, since a restart would not help, so alert on this.
        self.registry_available = Gauge(
            "msgd_registry_available", "1 while the registry takes writes", registry=r
        )
        self.registry_available.set(1)
        self.control = Counter(
            "msgd_control_requests", "Control socket requests, by command and result",
            ("command", "result"), registry=r,
        )
        self.certificates = _CertificateCollector()
        r.register(self.certificates)
        # File descriptors, memory and CPU of the daemon (LimitNOFILE= is worth watching).
        ProcessCollector(registry=r)

        self._children: dict[tuple[int, Any], Any] = {}
        self._message_children: dict[str, Any] = {}
        self._bulk_children = {kind: self.bulk_entries.labels(kind.label)
                               for kind in Procedure if kind.is_bulk}
        for kind, name in zip(Procedure, PROCEDURES, strict=True):
            self._children[(kind, None)] = self.procedures.labels(name, "success", "")
            for cause in FailureCause:
                self._children[(kind, cause)] = self.procedures.labels(name, "failure", cause.name)
        self._marks: deque[tuple[int, float]] = deque()
        self._marked = 0
        self._http: Any = None
        self.address: tuple[str, int] | None = None  # of the HTTP listener, once serving

    # --- hooks: procedures and traffic ------------------------------------------------------

    def answers(self, tally: Mapping[tuple[Procedure, FailureCause | int | None], int]) -> None:
        """Per-UE answers sent, counted by (procedure, cause sent): one call per write, not
        one per answer (a counter increment takes a lock)."""
        for (kind, cause), count in tally.items():
            child = self._children.get((kind, cause))
            if child is None:  # a cause value outside FailureCause (cannot happen; count it)
                child = self.procedures.labels(PROCEDURES[kind], "failure", str(cause))
            child.inc(count)
            bulk = self._bulk_children.get(kind)
            if bulk is not None:
                bulk.inc(count)

    def storage_failure(self) -> None:
        """An entry decided as a success failed to commit; counted by entry() with the cause
        actually sent, so nothing more to do here."""

    def bulk_started(self, kind: Procedure) -> None:
        self.bulk_transactions.labels(PROCEDURES[kind]).inc()

    def message(self, type_name: str) -> None:
        # Children kept: labels() takes a lock and builds a key per call, once per message.
        child = self._message_children.get(type_name)
        if child is None:
            child = self._message_children[type_name] = self.messages.labels(type_name)
        child.inc()

    def protocol_error(self, cause: ErrorCause) -> None:
        self.protocol_errors.labels(cause.name).inc()

    def peer_error(self, cause: int) -> None:
        self.peer_errors.labels(_cause_name(cause)).inc()

    def transaction_failed(self, cause: ErrorCause | int) -> None:
        self.transactions_failed.labels(_cause_name(cause)).inc()

    def goodbye(self, cause: ErrorCause) -> None:
        self.goodbyes.labels(cause.name).inc()

    def connection_accepted(self) -> None:
        self.accepted.inc()

    def connection_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def frames(self, count: int) -> None:
        self.frames_received.inc(count)

    def received(self, octets: int) -> None:
        self.bytes_in.inc(octets)

    def sent(self, octets: int) -> None:
        self.bytes_out.inc(octets)

    # --- hooks: group commit ----------------------------------------------------------------

    def submitted(self, last_seq: int, when: float) -> None:
        """Changes up to `last_seq` not marked yet were submitted at (or after) loop time `when`."""
        if last_seq > self._marked:
            marks = self._marks
            if len(marks) >= _MAX_MARKS:
                marks.popleft()
            marks.append((self._marked + 1, when))
            self._marked = last_seq

    def settled(self, first: int, last: int, ok: bool, now: float) -> None:
        """The registry settled changes first..last (listener callback); observe the batch."""
        marks = self._marks
        # Marks are in seq order; the one covering `first` is the last starting at or below it.
        submitted_at: float | None = None
        while marks and marks[0][0] <= first:
            submitted_at = marks.popleft()[1]
        # Marks inside the batch go; the newest of them may also cover changes after it.
        newest = submitted_at
        while marks and marks[0][0] <= last:
            newest = marks.popleft()[1]
        if newest is not None and last < self._marked and (not marks or marks[0][0] > last + 1):
            marks.appendleft((last + 1, newest))
        if not ok:
            self.commit_failures.inc()
        if submitted_at is not None:
            self.commit_latency.observe(max(0.0, now - submitted_at))
        self.commit_batch.observe(last - first + 1)

    def commit(self, seconds: float, changes: int) -> None:
        self.commit_latency.observe(seconds)
        self.commit_batch.observe(changes)

    # --- hooks: daemon state ----------------------------------------------------------------

    def bind_gauges(
        self,
        connected: Callable[[], float],
        registered: Callable[[], float],
        provisioned: Callable[[], float],
        pending: Callable[[], float] | None = None,
    ) -> None:
        """Gauges computed at scrape time (on the HTTP thread: the callables must only read)."""
        self.connected.set_function(connected)
        self.registered.set_function(registered)
        self.provisioned.set_function(provisioned)
        if pending is not None:
            self.pending.set_function(pending)

    def bind_registry(self, registry: Registry) -> None:
        """Journal size, file size and online compaction, read from `registry` at scrape time
        (plain attribute reads and a stat(); nothing that waits for the writer)."""
        self.registry.register(_RegistryCollector(registry))

    def set_certificates(self, items: Iterable[tuple[str, str, dt.datetime]]) -> None:
        """The configured certificates: (role, subject, not_after); see certificate_inventory."""
        self.certificates.configured = list(items)

    def set_crl_next_update(self, when: dt.datetime | None) -> None:
        self.certificates.crl_next_update = when

    def gateway_certificate(self, key: int, identity: str, not_after: dt.datetime | None) -> None:
        """A gateway connection (key: any id unique per connection) and its cert's expiry."""
        table = dict(self.certificates.gateways)
        if not_after is None:
            table.pop(key, None)
        else:
            table[key] = (identity, not_after)
        self.certificates.gateways = table  # replaced whole: the scrape thread reads it

    def reload_result(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.reload_ok.set(1 if ok else 0)
        if ok:
            self.reload_time.set(time.time())

    def control_request(self, command: str, ok: bool) -> None:
        self.control.labels(command, "success" if ok else "failure").inc()

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start the HTTP listener ([metrics] listen) in prometheus_client's thread.

        Returns the bound address (port 0 asks the kernel for a free port).
        """
        self._http = start_http_server(port, addr=host, registry=self.registry)
        server, _thread = self._http
        name = server.socket.getsockname()
        self.address = (name[0], name[1])
        return self.address

    def close(self) -> None:
        if self._http is not None:
            server, _thread = self._http
            server.shutdown()
            server.server_close()
            self._http = None


def certificate_inventory(
    certificate: Path, gateway_ca: Path
) -> list[tuple[str, str, dt.datetime]]:
    """(role, subject, not_after) of the server certificate chain and every gateway CA.

    Raises OSError or ValueError for unreadable files; the caller has already validated them
    by building the TLS context, so this only fails if a file changed in between.
    """
    from cryptography import x509

    out: list[tuple[str, str, dt.datetime]] = []
    for role, path in (("server", certificate), ("gateway_ca", gateway_ca)):
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
        for index, cert in enumerate(certs):
            name = role if role == "gateway_ca" or index == 0 else "server_chain"
            out.append((name, cert.subject.rfc4514_string(), cert.not_valid_after_utc))
    return out


class _LoopCounter:
    """One counter (one set of label values) that only the event-loop thread adds to."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class _LoopCounterFamily:
    """A counter's label children, as prometheus_client's `labels()` hands them out.

    `published` is what a scrape reads: a tuple the loop thread replaces whole when it adds
    a child (rare: label values are bounded). Copying `children` from the scrape's thread
    instead is not atomic: a garbage collection during the copy runs Python code (finalizers,
    gc callbacks), the loop thread may run then and add a child, and the copy fails.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _LoopCounter] = {}
        self.published: tuple[tuple[tuple[str, ...], _LoopCounter], ...] = ()

    def labels(self, *values: str) -> _LoopCounter:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
        key = tuple(str(value) for value in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _LoopCounter()
            self.published = (*self.published, (key, child))
        return child


class _LoopCounters(Collector):
    """Counters kept as plain ints by the loop thread, exposed as counters at scrape time.

    The loop thread adds; the HTTP server's thread reads. Under the GIL an attribute read is
    atomic, so a scrape sees each counter at some value it had, never a torn one, and reads
    the children from a tuple the loop only ever replaces, never one it changes.
    """

    def __init__(self) -> None:
        self.families: list[_LoopCounterFamily] = []

    def counter(self, name: str, documentation: str,
                labelnames: tuple[str, ...] = ()) -> _LoopCounterFamily:
        family = _LoopCounterFamily(name, documentation, labelnames)
        self.families.append(family)
        return family

    def describe(self) -> Iterator[Any]:
        for family in self.families:
            yield CounterMetricFamily(family.name, family.documentation,
                                      labels=family.labelnames)

    def collect(self) -> Iterator[Any]:
        for family in self.families:
            out = CounterMetricFamily(family.name, family.documentation,
                                      labels=family.labelnames)
            for labels, child in family.published:
                out.add_metric(labels, child.value)
            yield out


class _CertificateCollector(Collector):
    """Days until each certificate expires, computed at scrape time (the value keeps moving)."""

    def __init__(self) -> None:
        self.configured: list[tuple[str, str, dt.datetime]] = []
        self.crl_next_update: dt.datetime | None = None
        self.gateways: dict[int, tuple[str, dt.datetime]] = {}

    def describe(self) -> Iterator[Any]:
        # Returning nothing keeps CollectorRegistry from calling collect() at registration.
        return iter(())

    def collect(self) -> Iterator[Any]:
        now = dt.datetime.now(dt.UTC)
        configured = GaugeMetricFamily(
            "msgd_certificate_expiry_days",
            "Days until a configured certificate expires (negative: expired)",
            labels=("certificate", "subject"),
        )
        for role, subject, not_after in self.configured:
            configured.add_metric((role, subject), _days(not_after, now))
        yield configured
        crl = GaugeMetricFamily(
            "msgd_crl_next_update_days",
            "Days until the configured CRL must be replaced (absent without a CRL)",
        )
        if self.crl_next_update is not None:
            crl.add_metric((), _days(self.crl_next_update, now))
        yield crl
        gateways = GaugeMetricFamily(
            "msgd_gateway_certificate_expiry_days",
            "Days until the client certificate of a connected gateway expires (soonest)",
            labels=("gateway",),
        )
        soonest: dict[str, dt.datetime] = {}
        for identity, not_after in dict(self.gateways).values():
            if identity not in soonest or not_after < soonest[identity]:
                soonest[identity] = not_after
        for identity, not_after in sorted(soonest.items()):
            gateways.add_metric((identity,), _days(not_after, now))
        yield gateways


class _RegistryCollector(Collector):
    """The registry file and its online compaction, computed at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        registry = self._registry
        journal = registry.journal
        for name, help_text, value in (
            ("msgd_registry_journal_changes",
             "Changes in the registry journal not yet folded into the snapshot", journal.changes),
            ("msgd_registry_journal_rows", "Rows (group commits) in the registry journal",
             journal.rows),
            ("msgd_registry_journal_bytes", "Octets of the registry journal's rows",
             journal.octets),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        files = GaugeMetricFamily("msgd_registry_file_bytes",
                                  "Size of the registry file and of its WAL on disk",
                                  labels=("file",))
        main, wal = registry.file_sizes()
        files.add_metric(("main",), main)
        files.add_metric(("wal",), wal)
        yield files
        compaction = registry.compaction
        runs = CounterMetricFamily("msgd_registry_compactions",
                                   "Online compactions of the registry, by result",
                                   labels=("result",))
        runs.add_metric(("success",), compaction.ok_count)
        runs.add_metric(("failure",), compaction.failed_count)
        yield runs
        yield GaugeMetricFamily("msgd_registry_compaction_running",
                                "1 while an online compaction runs",
                                value=1 if compaction.running else 0)
        last = compaction.last
        ended = GaugeMetricFamily(
            "msgd_registry_last_compaction_timestamp_seconds",
            "Unix time the last online compaction ended (absent before the first)")
        took = GaugeMetricFamily("msgd_registry_last_compaction_duration_seconds",
                                 "How long the last online compaction took")
        folded = GaugeMetricFamily("msgd_registry_last_compaction_changes",
                                   "Changes the last online compaction folded into the snapshot")
        if last is not None:
            ended.add_metric((), last.started_at + last.seconds)
            took.add_metric((), last.seconds)
            folded.add_metric((), last.changes_folded)
        yield ended
        yield took
        yield folded


def _days(when: dt.datetime, now: dt.datetime) -> float:
    return (when - now).total_seconds() / _SECONDS_PER_DAY


def _cause_name(cause: ErrorCause | int) -> str:
    try:
        return ErrorCause(cause).name
    except ValueError:
        return str(int(cause))
