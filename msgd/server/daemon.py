"""`msgd --config FILE`: the MSGin5G Server daemon (TS 23.554 8.2.3, 8.2.4, 8.2.X over wire-v1).

main() returns the exit code: 0 after a clean stop, 1 on a runtime failure (e.g. the port is
taken), 2 for a bad configuration (one line naming the key), 3 for a registry file that fails
its check at start (never replaced). Nothing deeper calls sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import math
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msgd.config import Config, GatewayPolicy, load_config
from msgd.errors import (
    ConfigError,
    MsgdError,
    ProvisioningError,
    RegistryCorruptError,
    RegistryError,
    TLSSetupError,
)
from msgd.log import get_logger, setup_logging
from msgd.ops.control import ControlServer
from msgd.ops.metrics import HealthProbe, Metrics
from msgd.ops.systemd import Notifier
from msgd.registry.local import LocalRegistrar
from msgd.registry.provisioning import read_provisioning_csv
from msgd.registry.store import Registry
from msgd.server.connection import GatewayConnection
from msgd.server.ports import ConnectionSettings
from msgd.server.rules import UeRules
from msgd.tls.contexts import ServerTls, is_revoked, load_server_tls
from wire.constants import ErrorCause
from wire.session import Limits

log = get_logger("msgd.server")


class Server:
    """The listener, the connections, the registry, reload and shutdown."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
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
        self.settings = _connection_settings(config)
        self.rules = UeRules(registry.provisioned)
        self.registrar = LocalRegistrar(
            registry,
            max_pending_writes=config.limits.max_pending_writes,
            # Commit latency counts from the turn a change was submitted in.
            on_submit=lambda seq: self.metrics.submitted(seq, loop.time()),
        )
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
        self._set_certificate_metrics(tls)

    @property
    def node_name(self) -> str | None:
        return self.settings.node_name

    # --- registry completions ---------------------------------------------------------------

    def _on_batch(self, first: int, last: int, ok: bool) -> None:
        self.metrics.settled(first, last, ok, self.loop.time())
        if not ok:
            log.error("registry.commit_failed", first=first, last=last)

    # --- connections ------------------------------------------------------------------------

    async def start(self) -> None:
        host, port = self._listen(self.config.server.host, self.config.server.port)
        log.info("server.listening", address=_fmt_address(host, port),
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

    def hello_allowed(self, identity: str) -> int | None:
        """Reconnect-storm damping: None when `identity` may open a session now (it is then
        counted), else the Retry after in ms until the oldest of its last `reconnect_limit`
        sessions leaves the `reconnect_window`. Only configured identities get here, so the
        table is bounded by the gateway table."""
        limits = self.config.limits
        now = self.loop.time()
        began = self._hellos.setdefault(identity, collections.deque())
        while began and began[0] <= now - limits.reconnect_window:
            began.popleft()
        if len(began) >= limits.reconnect_limit:
            return max(1, math.ceil((began[0] + limits.reconnect_window - now) * 1000))
        began.append(now)
        return None

    def revoked_since_handshake(self, conn: GatewayConnection, peer_der: bytes | None) -> bool:
        """Whether a reload that happened during this connection's TLS handshake revoked its
        certificate (the handshake was checked against the CRL of its start)."""
        return conn.tls is not self.tls and is_revoked(self.tls.crl, peer_der)

    def connection_started(self, conn: GatewayConnection) -> None:
        self.connections.add(conn)
        self._all_closed.clear()
        self.metrics.connection_accepted()
        self.metrics.gateway_certificate(id(conn), conn.identity or "?", _peer_not_after(conn))
        self._status()

    def connection_ended(self, conn: GatewayConnection) -> None:
        self.connections.discard(conn)
        self.metrics.gateway_certificate(id(conn), "", None)
        if not self.connections:
            self._all_closed.set()
        self._status()

    def _status(self) -> None:
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
        """Read and check every input first (configuration, TLS files and CRL read once,
        provisioning committed last: after it nothing can fail), then switch in one step on
        the loop thread with no await in between (`_switch`)."""
        def failed(part: str, reason: str) -> dict[str, Any]:
            log.error("reload.failed", part=part, reason=reason, effect="nothing changed")
            return {"ok": False, "part": part, "error": reason}

        old = self.config
        if old.path is None:
            return failed("config", "the daemon was not started from a configuration file")
        try:
            new = load_config(old.path)
        except ConfigError as exc:
            return failed("config", str(exc))
        try:
            tls = load_server_tls(new.tls)
        except TLSSetupError as exc:
            return failed("tls", str(exc))
        try:
            count = await asyncio.to_thread(
                self.registry.replace_provisioning, read_provisioning_csv(new.provisioning.file)
            )
        except (ProvisioningError, RegistryError, OSError) as exc:
            return failed("provisioning", str(exc))
        log.info("reload.provisioning", provisioned=count, file=str(new.provisioning.file))
        return self._switch(new, tls, count)

    def _switch(self, new: Config, tls: ServerTls, count: int) -> dict[str, Any]:
        """The second half of a reload: assignments, then what each live session must learn
        (wire-v1 §4 item 6). Each connection is handled in isolation: one that fails is closed
        and the switch goes on."""
        old = self.config
        self.tls = tls
        self.metrics.set_certificates(tls.inventory)
        self.metrics.set_crl_next_update(tls.crl.next_update_utc if tls.crl is not None else None)
        log.info("reload.tls", certificate=str(new.tls.certificate),
                 serial=tls.certificate_serial, crl=str(new.tls.crl or ""),
                 revoked=len(tls.crl) if tls.crl is not None else 0)
        # Keys read once at start keep their old values until a restart; say which changed.
        fixed = {"server.listen": (old.server.listen, new.server.listen),
                 "registry": (old.registry, new.registry),
                 "metrics.listen": (old.metrics.listen, new.metrics.listen),
                 "control.socket": (old.control.socket, new.control.socket)}
        restart = sorted(key for key, (was, now) in fixed.items() if was != now)
        if restart:
            log.warning("reload.restart_needed", keys=",".join(restart))
        self.config = dataclasses.replace(
            new,
            server=dataclasses.replace(old.server, node_name=new.server.node_name),
            registry=old.registry,
            metrics=old.metrics,
            control=old.control,
        )
        self.settings = _connection_settings(new)
        self.registrar.max_pending_writes = new.limits.max_pending_writes
        if new.log.level != old.log.level:
            setup_logging(new.log.level)  # the level was checked by load_config
        added = sorted(set(new.gateways) - set(self.gateways))
        removed = sorted(set(self.gateways) - set(new.gateways))
        self.gateways = dict(new.gateways)
        ended = {"sessions_revoked": 0, "sessions_removed": 0, "sessions_settings_changed": 0}
        for conn in list(self.connections):
            try:
                outcome = self._recheck(conn, tls)
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

    def _recheck(self, conn: GatewayConnection, tls: ServerTls) -> str | None:
        """Apply a reload to one live connection; what happened to it, or None."""
        if conn.session is None:
            return None
        if tls.crl is not None and is_revoked(tls.crl, conn.peer_der()):
            conn.log.warning("gateway.revoked", effect="GOODBYE(GATEWAY_NOT_ALLOWED)")
            conn.revoke("certificate revoked")
            return "sessions_revoked"
        if conn.identity is None or conn.policy is None:
            return None  # no HELLO yet: the identity is checked against the new table then
        policy = self.gateways.get(conn.identity)
        if policy is None:
            conn.log.warning("gateway.removed", effect="GOODBYE(GATEWAY_NOT_ALLOWED)")
            conn.revoke("gateway removed from configuration")
            return "sessions_removed"
        if policy != conn.policy and not conn.session.goodbye_sent:
            # HELLO ACK announced the old settings: they hold until the session ends.
            conn.log.info("gateway.settings_changed", effect="GOODBYE(NORMAL)")
            conn.goodbye(ErrorCause.NORMAL, "gateway settings changed: reconnect to learn them")
            return "sessions_settings_changed"
        return None

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
        return (
            f"{state}{len(self.connections)} gateways, "
            f"{self.registry.registered_count()} UEs registered"
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
        self._status()
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
        where = _fmt_address(host, port)
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
        self._status()
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


def _connection_settings(config: Config) -> ConnectionSettings:
    """What connections read of `config` (at start, and whole after a reload)."""
    limits = config.limits
    return ConnectionSettings(
        limits=Limits(
            max_frame_size=limits.max_frame_size,
            max_bulk_entries=limits.max_bulk_entries,
            max_outstanding=limits.max_outstanding,
            keepalive_interval=limits.keepalive_interval,
            hello_timeout=limits.hello_timeout,
        ),
        bulk_window=limits.bulk_window,
        frame_timeout=limits.frame_timeout,
        node_name=config.server.node_name,
    )


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
    return _fmt_address(host, port)


def _fmt_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _watchdog(server: Server, period: float | None) -> None:
    """Probe the daemon's health every tick; WATCHDOG=1 only while it is healthy.

    `period` is WatchdogSec (None: no watchdog; the probe still feeds the loop-lag metric and
    STATUS=). Pings go out every period/4 (at most every second), so one withheld ping does
    not by itself make systemd restart us. A loop blocked for the whole period sends nothing;
    a loop more than period/2 late, or registry changes pending for period/2 with no batch
    settling (a hung fsync, a database lock held elsewhere), withholds the pings until it
    recovers, and systemd restarts msgd if that lasts.
    """
    tick = min(1.0, period / 4) if period else 1.0
    limit = period / 2 if period else float("inf")
    registry = server.registry
    probe = HealthProbe(
        tick, max_lag=limit, max_stall=limit, pending=registry.pending,
        durable=lambda: registry.durable_seq,
    )
    metrics = server.metrics
    if period:
        log.info("watchdog.enabled", period=period, ping_every=tick)
        server.notifier.watchdog()
    withheld_since: float | None = None
    worst = 0.0
    while True:
        await asyncio.sleep(tick)
        healthy, lag, stall = probe.check()
        metrics.loop_lag.set(lag)
        if lag > worst:
            worst = lag
            metrics.loop_lag_max.set(lag)
        server._status()
        if healthy:
            if period:
                server.notifier.watchdog()
            if withheld_since is not None:
                withheld_for = round(time.monotonic() - withheld_since, 3)
                log.info("watchdog.resumed", withheld_for=withheld_for)
                withheld_since = None
            continue
        reason = "loop_lag" if lag > limit else "registry_stalled"
        metrics.watchdog_withheld.labels(reason).inc()
        if withheld_since is None:
            withheld_since = time.monotonic()
            log.warning("watchdog.withheld", reason=reason, loop_lag=round(lag, 3),
                        registry_stalled_for=round(stall, 3), pending=registry.pending())


async def serve(
    config: Config, registry: Registry, tls: ServerTls, notifier: Notifier
) -> int:
    loop = asyncio.get_running_loop()
    registry.start(loop)
    server = Server(config, registry, tls, loop, notifier)
    stop = asyncio.Event()
    # Handlers first: a SIGTERM that arrives as soon as we listen must still stop us cleanly
    # (a SIGHUP before READY=1 is held until then: see Server.reload).
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    try:
        await server.start()
    except OSError as exc:
        log.error("server.bind_failed", address=config.server.listen, reason=str(exc))
        await registry.close()
        return 1
    if config.metrics.listen:
        try:
            host, port = server.metrics.serve(
                config.metrics.host or "127.0.0.1", config.metrics.port or 0)
            log.info("metrics.listening", address=_fmt_address(host, port))
        except OSError as exc:
            log.error("metrics.bind_failed", address=config.metrics.listen, reason=str(exc))
    control = None
    if config.control.socket is not None:
        control = ControlServer(server, config.control.socket)
        await control.start()
    watchdog = loop.create_task(_watchdog(server, notifier.watchdog_interval()))
    # The listener is bound and the registry loaded: only now READY=1.
    server.mark_ready()
    await stop.wait()
    await server.shutdown()
    if control is not None:
        await control.close()
    server.metrics.close()
    await registry.close()
    watchdog.cancel()
    log.info("server.stopped")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="msgd", description="MSGin5G Server daemon (TS 23.554 Non-MSGin5G UE registration)"
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration, TLS files and provisioning file as a reload would, "
        "then exit (0: usable)",
    )
    parser.add_argument("--log-level", help="override [log] level")
    return parser.parse_args(argv)


def _check_config(path: Path, config: Config) -> int:
    """--check-config (also systemd's ExecReload= pre-check): what a reload would read."""
    try:
        load_server_tls(config.tls)
        count = sum(1 for _row in read_provisioning_csv(config.provisioning.file))
    except TLSSetupError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 2
    except ProvisioningError as exc:
        print(f"msgd: provisioning.file: {exc}", file=sys.stderr)
        return 2
    print(f"msgd: {path}: ok (TLS files usable, {count} UEs provisioned)")
    return 0


def _pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at its 128 KiB default instead of letting it rise.

    uvloop gives every TLS connection a 256 KiB read buffer. Once the first such block is
    freed, glibc raises its threshold, and from then on these buffers come from the heap,
    where reused, already resident pages made each idle connection cost ~125 KB of RSS
    instead of ~40 KB (bench/, 10,000 idle connections; docs/performance.md). Pinning it keeps
    large buffers in their own mappings: only the pages actually written are resident, and
    a closed connection's buffer goes back to the system. Not glibc: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD
    mallopt(m_mmap_threshold, 128 * 1024)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _pin_mmap_threshold()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level)
    if args.check_config:
        return _check_config(args.config, config)
    try:
        tls = load_server_tls(config.tls)
    except TLSSetupError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 2
    try:
        registry = Registry.open(config.registry.path, synchronous=config.registry.synchronous)
    except RegistryCorruptError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 3
    except MsgdError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 1
    try:
        count = registry.replace_provisioning(read_provisioning_csv(config.provisioning.file))
    except (ProvisioningError, OSError) as exc:
        registry.close_sync()
        print(f"msgd: provisioning.file: {exc}", file=sys.stderr)
        return 2
    log.info("provisioning.loaded", provisioned=count, file=str(config.provisioning.file))
    notifier = Notifier.from_env()
    try:
        import uvloop

        return uvloop.run(serve(config, registry, tls, notifier))
    finally:
        notifier.close()


if __name__ == "__main__":
    raise SystemExit(main())
