"""The running daemon's hub: the accept loop, the live connections, admission (gateway table,
reconnect-storm damping, revocation), reload, drain and shutdown.

Process wiring (configuration, registry, signals, the control socket) is `server.main`'s;
the per-connection protocol is `server.connection`'s, which sees this class only through
`ports.ConnectionHost`, as `ops.control` sees it through `ports.AdminHost`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import math
import socket
import ssl
import time
from typing import Any

from msgd.config import Config, GatewayPolicy
from msgd.log import get_logger, setup_logging
from msgd.ops.metrics import Metrics
from msgd.ops.systemd import Notifier
from msgd.ops.watchdog import LoopLagProbe
from msgd.registry.service import RegistryService, make_registrar, reads_for
from msgd.registry.store import Registry
from msgd.server.connection import GatewayConnection
from msgd.server.overload import SAMPLE_INTERVAL, Episode, OverloadPolicy
from msgd.server.ports import ConnectionSettings, Refusal
from msgd.server.reload import ReloadFailed, kept_config, read_inputs, recheck
from msgd.server.rules import UeRules
from msgd.tls.contexts import ServerTls, is_revoked
from wire.constants import ErrorCause

log = get_logger("msgd.server")

_NOT_ALLOWED = Refusal(ErrorCause.GATEWAY_NOT_ALLOWED, "gateway identity not allowed",
                       "gateway_not_allowed", "identity not in [[gateways]]")


class Server:
    """The listener, the connections, the registry, reload and shutdown.

    Over 400 lines since the overload contract: the ConnectionHost and AdminHost ports are
    this object (admission, revocation, reload, drain, status), and the overload gate
    (refuse_request, its sampling task) needs the connections and the registry it holds; the
    decisions are already in msgd/server/overload.py, and the gate is the part to move out
    next (a small object given the connections and the registrar)."""

    def __init__(
        self,
        config: Config,
        registry: RegistryService,
        tls: ServerTls,
        loop: asyncio.AbstractEventLoop,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.tls = tls
        self.loop = loop
        self.notifier = notifier or Notifier(None)
        self.metrics = Metrics()
        self.gateways: dict[str, GatewayPolicy] = dict(config.gateways)
        self.settings = ConnectionSettings.from_config(config)
        self.rules = UeRules(registry.provisioning.key_and_gateways)
        self.registrar = make_registrar(
            registry,
            max_pending_writes=config.limits.max_pending_writes,
            # Commit latency counts from the turn a change was submitted in.
            on_submit=lambda seq: self.metrics.submitted(seq, loop.time()),
        )
        # The overload contract (docs/protocol.md §7): new requests beyond what drains within
        # [overload] max_delay are refused (refuse_request, admit).
        self.overload = OverloadPolicy(config.overload, loop.time())
        # What the admin socket reads, and the registry's health for STATUS= and metrics.
        self.reads = reads_for(registry, str(config.registry.path or ""))
        self.metrics.registry_available.set_function(
            lambda: 0.0 if self.reads.health() else 1.0)
        self.connections: set[GatewayConnection] = set()
        self._handshaking = 0
        self._lsock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.stopping = False
        self.draining = False
        self.address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Reconnect-storm damping: when each gateway identity's recent sessions began.
        self._hellos: dict[str, collections.deque[float]] = {}
        self.started_at = time.time()
        self.ready = False
        self._reload_lock = asyncio.Lock()
        self._reload_queued = False
        self.last_reload: dict[str, Any] | None = None
        self._status_sent = ""
        registry.add_listener(self._on_batch)
        self.metrics.bind_gauges(
            lambda: len(self.connections),
            registry.registered_count,
            registry.provisioned_count,
            registry.pending,
        )
        if isinstance(registry, Registry):  # the embedded one's file, journal and compaction
            self.metrics.bind_registry(registry)
        self._set_certificate_metrics(tls)

    @property
    def node_name(self) -> str | None:
        return self.settings.node_name

    # --- registry completions ---------------------------------------------------------------

    def _on_batch(self, first: int, last: int, ok: bool) -> None:
        self.metrics.settled(first, last, ok, self.loop.time())
        if not ok:
            log.error("registry.commit_failed", first=first, last=last)

    # --- overload (docs/protocol.md §7) -------------------------------------------------------

    def refuse_request(self, what: str, unsubmitted: int = 0) -> int | None:
        """None: a new request may start; else the Retry after (ms) to refuse it with.
        `what` is the metric's label: "single" (answered SERVER_BUSY), "bulk" (ERROR
        (OVERLOADED)); `unsubmitted` the changes the caller decided this turn and has not
        handed to the registry yet (they are in no queue the registry can count)."""
        pending = self.registry.pending() + unsubmitted
        retry, episode = self.overload.admit(self.loop.time(), pending)
        if retry is not None:
            self._overload_refused(what, 1, episode)
        return retry

    def _overload_refused(self, what: str, count: int, episode: Episode | None) -> None:
        self.metrics.overload_refused.labels(what).inc(count)
        if episode is not None:
            self.metrics.overloaded.set(1)
            self.metrics.overload_episodes.inc()
            policy = self.overload
            log.warning("overload.started", reason=episode.reason,
                        pending=self.registry.pending(), owed=policy.owed,
                        bound=policy.bound(), drain_rate=round(policy.drain_rate),
                        loop_lag_ms=round(policy.loop_lag * 1000, 1),
                        retry_after_ms=policy.retry_after_ms(self.registry.pending()))

    async def _sample_overload(self) -> None:
        """Feed the overload policy its measurements every SAMPLE_INTERVAL seconds; log the
        end of an episode (its start is logged by the refusal that began it)."""
        lag = LoopLagProbe(SAMPLE_INTERVAL)
        registry = self.registry
        owed = 0
        tick = 0
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            tick += 1
            if tick % 4 == 0:  # every 0.2 s: a read per connection (10,000 idle: ~1 ms)
                owed = sum(conn.owed for conn in self.connections)
            ended = self.overload.sample(
                self.loop.time(), loop_lag=lag.tick(), durable=registry.durable_seq,
                pending=registry.pending(), owed=owed)
            if ended is not None:
                self.metrics.overloaded.set(0)
                log.warning("overload.ended", reason=ended.reason,
                            duration_s=round(ended.duration, 3), refused=ended.refused)

    # --- connections ------------------------------------------------------------------------

    async def start(self) -> None:
        task = self.loop.create_task(self._sample_overload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        host, port = self._listen(self.config.server.host, self.config.server.port)
        log.info("server.listening", address=fmt_address(host, port),
                 registered=self.registry.registered_count(),
                 provisioned=self.registry.provisioned_count())

    def _listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind the listener and start accepting (start(), undrain()); returns the address
        bound. An OSError from the bind leaves everything as it was."""
        # Our own accept loop: a connection over max_connections is closed before any TLS
        # work, and the TLS handshake of each accepted socket runs in its own task.
        sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._lsock = sock
        name = sock.getsockname()
        self.address = (name[0], name[1])
        self._accepting = self.loop.create_task(self._accept_loop(sock))
        return self.address

    def _stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None

    async def _accept_loop(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _addr = await self.loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                # EMFILE and friends: log, back off a little, keep the listener alive.
                log.error("server.accept_failed", reason=str(exc))
                await asyncio.sleep(0.1)
                continue
            self.accept(sock)

    def accept(self, sock: socket.socket) -> None:
        if self.stopping or self.draining:
            sock.close()
            return
        # Refused before any TLS work: the limit must be cheap to enforce under a flood.
        if len(self.connections) + self._handshaking >= self.config.limits.max_connections:
            self.metrics.connection_refused("max_connections")
            sock.close()
            return
        self._handshaking += 1
        task = self.loop.create_task(self._handshake(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        tls = self.tls
        conn = GatewayConnection(self, accepted_at=self.loop.time(), tls=tls)
        peer = _peer_of(sock)  # now: the socket may be gone once the handshake failed
        try:
            await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=tls.context,
                ssl_handshake_timeout=self.config.limits.hello_timeout)
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            self.metrics.connection_refused("tls")
            log.info("tls.failed", peer=peer, reason=type(exc).__name__,
                     detail=str(exc)[:200])
            with contextlib.suppress(OSError):
                sock.close()
        finally:
            self._handshaking -= 1

    def admit(self, identity: str | None) -> GatewayPolicy | Refusal:
        """The admission check of a HELLO: the gateway's policy, or why not. An identity not in
        [[gateways]] is refused; a configured one is damped when it opened `reconnect_limit`
        sessions within `reconnect_window` (reconnect storm), with the Retry after in ms until
        the oldest of them leaves the window. Only configured identities are counted, so the
        table is bounded by the gateway table."""
        policy = self.gateways.get(identity or "")
        if policy is None:
            return _NOT_ALLOWED
        limits = self.config.limits
        now = self.loop.time()
        # Overloaded: a new session would add work (docs/protocol.md §7). Not counted as a
        # session for the storm damping below: the gateway did nothing wrong.
        busy = self.overload.session_retry_ms(self.registry.pending())
        if busy is not None:
            self.metrics.overload_refused.labels("session").inc()
            return Refusal(ErrorCause.OVERLOADED, "server overloaded", "overloaded",
                           "overloaded", busy)
        began = self._hellos.setdefault(policy.identity, collections.deque())
        while began and began[0] <= now - limits.reconnect_window:
            began.popleft()
        if len(began) >= limits.reconnect_limit:
            retry_after = max(1, math.ceil((began[0] + limits.reconnect_window - now) * 1000))
            return Refusal(ErrorCause.OVERLOADED, "too many sessions from this gateway",
                           "reconnect_storm", "reconnect storm", retry_after)
        began.append(now)
        return policy

    def revoked_since_handshake(self, conn: GatewayConnection, peer_der: bytes | None) -> bool:
        """Whether a reload that happened during this connection's TLS handshake revoked its
        certificate (the handshake was checked against the CRL of its start)."""
        return conn.tls is not self.tls and is_revoked(self.tls.crl, peer_der)

    def connection_started(self, conn: GatewayConnection) -> None:
        self.connections.add(conn)
        self._all_closed.clear()
        self.metrics.connection_accepted()
        self.metrics.gateway_certificate(id(conn), conn.identity or "?", _peer_not_after(conn))
        self.refresh_status()

    def connection_ended(self, conn: GatewayConnection) -> None:
        self.connections.discard(conn)
        self.metrics.gateway_certificate(id(conn), "", None)
        if not self.connections:
            self._all_closed.set()
        self.refresh_status()

    def refresh_status(self) -> None:
        """STATUS= for systemctl status, sent when its text changed (the watchdog tick
        calls this too, so registration counts stay current without a datagram per change)."""
        text = self._status_text()
        if text != self._status_sent:
            self._status_sent = text
            self.notifier.status(text)

    # --- reload and shutdown ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: reload in a task. A reload already queued (not yet started) covers this one;
        one arriving while a reload runs queues another, since files may have changed after
        the running one read them."""
        if self._reload_queued or self.stopping:
            return
        if not self.ready:
            log.info("reload.deferred", reason="not ready yet")
            self._reload_queued = True
            return
        self._reload_queued = True
        task = self.loop.create_task(self.reload_now(queued=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload_now(self, *, queued: bool = False) -> dict[str, Any]:
        """Re-read the configuration, TLS files, CRL and provisioning; apply all or nothing.

        Returns what `msgctl reload` shows: {"ok", "part" and "error" on failure, "changes"}.
        RELOADING=1 (with MONOTONIC_USEC) goes to systemd first and READY=1 last, whatever
        the outcome: the daemon keeps serving with the old state after a failed reload.
        """
        async with self._reload_lock:
            if queued:
                self._reload_queued = False
            if self.stopping:  # SIGTERM came first: no RELOADING=1 after STOPPING=1
                return {"ok": False, "part": "state", "error": "shutting down"}
            self.notifier.reloading("reloading: " + self._status_text())
            log.info("reload.started", config=str(self.config.path))
            try:
                result = await self._reload()
            except Exception as exc:  # a bug here must not take the running daemon down
                log.exception("reload.failed", part="internal", reason=type(exc).__name__)
                result = {"ok": False, "part": "internal", "error": type(exc).__name__}
            result["at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.last_reload = result
            self.metrics.reload_result(result["ok"])
            self._status_sent = ""
            self.notifier.ready(self._status_text())
            return result

    async def _reload(self) -> dict[str, Any]:
        """Read and check every input first (`reload.read_inputs`), then switch in one step on
        the loop thread with no await in between (`_switch`)."""
        try:
            inputs = await read_inputs(self.config.path, self.registry)
        except ReloadFailed as exc:
            log.error("reload.failed", part=exc.part, reason=str(exc), effect="nothing changed")
            return {"ok": False, "part": exc.part, "error": str(exc)}
        log.info("reload.provisioning", provisioned=inputs.provisioned,
                 file=str(inputs.config.provisioning.file))
        return self._switch(inputs.config, inputs.tls, inputs.provisioned)

    def _switch(self, new: Config, tls: ServerTls, count: int) -> dict[str, Any]:
        """The second half of a reload: assignments, then what each live session must learn
        (`reload.recheck`). Each connection is handled in isolation: one that fails is closed
        and the switch goes on."""
        old = self.config
        self.tls = tls
        self._set_certificate_metrics(tls)
        log.info("reload.tls", certificate=str(new.tls.certificate),
                 serial=tls.certificate_serial, crl=str(new.tls.crl or ""),
                 revoked=len(tls.crl) if tls.crl is not None else 0)
        self.config, restart = kept_config(old, new)
        if restart:
            log.warning("reload.restart_needed", keys=",".join(restart))
        self.settings = ConnectionSettings.from_config(new)
        self.registrar.max_pending_writes = new.limits.max_pending_writes
        self.overload.config = new.overload
        if new.log.level != old.log.level:
            setup_logging(new.log.level)  # the level was checked by load_config
        added = sorted(set(new.gateways) - set(self.gateways))
        removed = sorted(set(self.gateways) - set(new.gateways))
        self.gateways = dict(new.gateways)
        ended = {"sessions_revoked": 0, "sessions_removed": 0, "sessions_settings_changed": 0}
        for conn in list(self.connections):
            try:
                outcome = recheck(conn, tls, self.gateways)
            except Exception as exc:  # one connection's bug must not stop the switch
                conn.fail(exc)
                continue
            if outcome is not None:
                ended[outcome] += 1
        log.info("reload.done", gateways=len(self.gateways), added=",".join(added),
                 removed=",".join(removed), provisioned=count, **ended)
        return {"ok": True, "changes": {
            "gateways_added": added, "gateways_removed": removed, "provisioned": count,
            "sessions_ended": sum(ended.values()), **ended, "restart_needed": restart}}

    def mark_ready(self) -> None:
        """READY=1 (serve() calls this once listening and loaded); runs a SIGHUP held till now."""
        self.ready = True
        self._status_sent = self._status_text()
        self.notifier.ready(self._status_sent)
        if self._reload_queued:
            self._reload_queued = False
            self.reload()

    def _set_certificate_metrics(self, tls: ServerTls) -> None:
        self.metrics.set_certificates(tls.inventory)
        self.metrics.set_crl_next_update(tls.crl.next_update_utc if tls.crl is not None else None)

    def _status_text(self) -> str:
        state = "stopping, " if self.stopping else "draining, " if self.draining else ""
        problem = self.reads.health()
        return (
            f"{state}{len(self.connections)} gateways, "
            f"{self.registry.registered_count()} UEs registered"
            + (f", registry: {problem}" if problem else "")
        )

    def drain(self) -> int:
        """Stop accepting and say GOODBYE to everyone (admin `drain`); how many were told.

        undrain() is its inverse."""
        if not self.draining:
            log.warning("server.draining", gateways=len(self.connections))
        self.draining = True
        self.metrics.draining.set(1)
        self._stop_accepting()
        told = 0
        for conn in list(self.connections):
            if conn.session is not None and not conn.session.goodbye_sent:
                conn.goodbye(ErrorCause.SHUTTING_DOWN, "server draining")
                told += 1
        self.refresh_status()
        return told

    def undrain(self) -> str | None:
        """Accept gateways again after drain() (admin `undrain`): the listener is re-opened on
        the address it had. Returns None once listening (also when not draining), else why
        not: the bind failed (say the port was taken meanwhile) and the server stays
        draining."""
        if self.stopping:
            return "shutting down"
        if not self.draining:
            return None
        host, port = self.address or (self.config.server.host, self.config.server.port)
        where = fmt_address(host, port)
        try:
            self._listen(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("server.undrain_failed", address=where, reason=reason,
                      effect="still draining")
            return f"cannot listen on {where}: {reason}"
        self.draining = False
        self.metrics.draining.set(0)
        log.warning("server.undrained", address=where, gateways=len(self.connections))
        self.refresh_status()
        return None

    async def shutdown(self) -> None:
        """SIGTERM: GOODBYE(SHUTTING_DOWN), let transactions finish within the grace period."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping("shutting down")
        log.info("server.stopping", gateways=len(self.connections))
        self._stop_accepting()
        for conn in list(self.connections):
            conn.goodbye(ErrorCause.SHUTTING_DOWN, "server shutting down")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_closed.wait(), self.config.limits.shutdown_grace)
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        self.registry.remove_listener(self._on_batch)


def _peer_not_after(conn: GatewayConnection) -> dt.datetime | None:
    transport = conn.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert or "notAfter" not in cert:
        return None
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), dt.UTC)


def _peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return fmt_address(host, port)


def fmt_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
