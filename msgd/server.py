"""`msgd --config FILE`: the MSGin5G Server daemon (TS 23.554 8.2.3, 8.2.4, 8.2.X over wire-v1).

main() returns the exit code: 0 after a clean stop, 1 on a runtime failure (e.g. the port is
taken), 2 for a bad configuration (one line naming the key), 3 for a registry file that fails
its check at start (never replaced). Nothing deeper calls sys.exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wire.constants import ErrorCause
from wire.session import Limits

from .config import Config, GatewayPolicy, load_config
from .errors import ConfigError, MsgdError, ProvisioningError, RegistryCorruptError, TLSSetupError
from .log import get_logger, setup_logging
from .metrics import LoopLagProbe, Metrics
from .provisioning import read_provisioning_csv
from .registry import Registry
from .service import Registrar
from .systemd import Notifier
from .tls import server_context
from .transport import GatewayConnection

log = get_logger("msgd.server")


class Server:
    """The listener, the connections, the registry, reload and shutdown."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        ssl_context: ssl.SSLContext,
        loop: asyncio.AbstractEventLoop,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.ssl_context = ssl_context
        self.loop = loop
        self.notifier = notifier or Notifier(None)
        self.metrics = Metrics()
        self.gateways: dict[str, GatewayPolicy] = dict(config.gateways)
        self.node_name = config.server.node_name
        limits = config.limits
        self.session_limits = Limits(
            max_frame_size=limits.max_frame_size,
            max_bulk_entries=limits.max_bulk_entries,
            max_outstanding=limits.max_outstanding,
            keepalive_interval=limits.keepalive_interval,
            hello_timeout=limits.hello_timeout,
        )
        self.bulk_window = limits.bulk_window
        self.registrar = Registrar(registry, max_pending_writes=limits.max_pending_writes)
        self.connections: set[GatewayConnection] = set()
        self._handshaking = 0
        self._waiting: set[GatewayConnection] = set()
        self._durable = registry.durable_seq
        self._failed = (0, -1)
        self._lsock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self.stopping = False
        self.draining = False
        self.address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        registry.add_listener(self._on_batch)
        self.metrics.bind_gauges(
            lambda: len(self.connections), registry.registered_count, registry.provisioned_count
        )

    # --- registry completions ---------------------------------------------------------------

    def registry_last_seq(self) -> int:
        return self.registry.last_seq

    def registry_state(self) -> tuple[int, int, int]:
        return self._durable, self._failed[0], self._failed[1]

    def _on_batch(self, first: int, last: int, ok: bool) -> None:
        if ok:
            self._durable = max(self._durable, last)
        else:
            self._failed = (first, last)
            log.error("registry.commit_failed", first=first, last=last)
        durable, (ff, fl) = self._durable, self._failed
        for conn in list(self._waiting):
            conn.on_registry(durable, ff, fl)

    def connection_waiting(self, conn: GatewayConnection) -> None:
        self._waiting.add(conn)

    def connection_idle(self, conn: GatewayConnection) -> None:
        self._waiting.discard(conn)

    # --- connections ------------------------------------------------------------------------

    async def start(self) -> None:
        host, port = self.config.server.host, self.config.server.port
        # Our own accept loop: a connection over max_connections is closed before any TLS
        # work, and the TLS handshake of each accepted socket runs in its own task.
        sock = socket.create_server((host, port), backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._lsock = sock
        name = sock.getsockname()
        self.address = (name[0], name[1])
        self._accepting = self.loop.create_task(self._accept_loop(sock))
        log.info("server.listening", address=_fmt_address(name[0], name[1]),
                 registered=self.registry.registered_count(),
                 provisioned=self.registry.provisioned_count())

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
        conn = GatewayConnection(self)
        try:
            await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=self.ssl_context,
                ssl_handshake_timeout=self.config.limits.hello_timeout)
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            self.metrics.connection_refused("tls")
            log.info("tls.failed", reason=type(exc).__name__, detail=str(exc)[:200])
            with contextlib.suppress(OSError):
                sock.close()
        finally:
            self._handshaking -= 1

    def connection_started(self, conn: GatewayConnection) -> None:
        self.connections.add(conn)
        self._all_closed.clear()
        self._status()

    def connection_ended(self, conn: GatewayConnection) -> None:
        self.connections.discard(conn)
        self._waiting.discard(conn)
        if not self.connections:
            self._all_closed.set()
        self._status()

    def _status(self) -> None:
        self.notifier.status(
            f"{len(self.connections)} gateways, {self.registry.registered_count()} UEs registered"
        )

    # --- reload and shutdown ----------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: TLS material, provisioning and the gateway table; the old stays on error."""
        self.notifier.reloading()
        ok = True
        try:
            path = self.config.path
            assert path is not None
            new = load_config(path)
        except (ConfigError, AssertionError) as exc:
            log.error("reload.failed", part="config", reason=str(exc))
            self.notifier.ready(self._status_text())
            return False
        try:
            self.ssl_context = server_context(new.tls)
            log.info("reload.tls", certificate=str(new.tls.certificate))
        except TLSSetupError as exc:
            ok = False
            log.error("reload.failed", part="tls", reason=str(exc))
        try:
            count = self.registry.replace_provisioning(read_provisioning_csv(new.provisioning.file))
            log.info("reload.provisioning", provisioned=count)
        except (ProvisioningError, OSError) as exc:
            ok = False
            log.error("reload.failed", part="provisioning", reason=str(exc))
        self.gateways = dict(new.gateways)
        self.config = new
        revoked = _revoked_serials(new)
        for conn in list(self.connections):
            if conn.identity not in self.gateways:
                log.info("gateway.removed", gateway=conn.identity)
                conn.goodbye(ErrorCause.GATEWAY_NOT_ALLOWED, "gateway removed from configuration")
            elif revoked and _peer_serial(conn) in revoked:
                log.info("gateway.revoked", gateway=conn.identity)
                conn.goodbye(ErrorCause.GATEWAY_NOT_ALLOWED, "certificate revoked")
            elif conn.identity is not None:
                conn.policy = self.gateways[conn.identity]
        self.notifier.ready(self._status_text())
        return ok

    def _status_text(self) -> str:
        return (
            f"{len(self.connections)} gateways, {self.registry.registered_count()} UEs registered"
        )

    def drain(self) -> None:
        """Stop accepting and say GOODBYE to everyone (admin `drain`)."""
        self.draining = True
        self._stop_accepting()
        for conn in list(self.connections):
            conn.goodbye(ErrorCause.SHUTTING_DOWN, "server draining")

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


def _revoked_serials(config: Config) -> set[int]:
    if config.tls.crl is None:
        return set()
    from cryptography import x509

    try:
        crl = x509.load_pem_x509_crl(Path(config.tls.crl).read_bytes())
    except (OSError, ValueError):
        return set()
    return {entry.serial_number for entry in crl}


def _peer_serial(conn: GatewayConnection) -> int | None:
    transport = conn.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    serial = cert.get("serialNumber") if cert else None
    return int(serial, 16) if serial else None


def _fmt_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _watchdog(server: Server, interval: float) -> None:
    """WATCHDOG=1 only while the loop runs on time and the registry writer makes progress."""
    probe = LoopLagProbe(interval)
    last_durable = server.registry.durable_seq
    while True:
        await asyncio.sleep(interval)
        lag = probe.tick()
        server.metrics.loop_lag.set(lag)
        durable = server.registry.durable_seq
        stuck = server.registry.pending() > 0 and durable == last_durable
        last_durable = durable
        if lag < interval and not stuck:
            server.notifier.watchdog()
        else:
            log.warning("watchdog.withheld", loop_lag=round(lag, 3), writer_stuck=stuck)


async def serve(
    config: Config, registry: Registry, ssl_context: ssl.SSLContext, notifier: Notifier
) -> int:
    loop = asyncio.get_running_loop()
    registry.start(loop)
    server = Server(config, registry, ssl_context, loop, notifier)
    stop = asyncio.Event()
    # Handlers first: a SIGTERM that arrives as soon as we listen must still stop us cleanly.
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
            server.metrics.serve(config.metrics.host or "127.0.0.1", config.metrics.port or 0)
        except OSError as exc:
            log.error("metrics.bind_failed", address=config.metrics.listen, reason=str(exc))
    control = None
    if config.control.socket is not None:
        from .control import ControlServer

        control = ControlServer(server, config.control.socket)
        await control.start()
    tasks = []
    interval = notifier.watchdog_interval()
    if interval:
        tasks.append(loop.create_task(_watchdog(server, interval / 2)))
    else:
        tasks.append(loop.create_task(_watchdog(server, 1.0)))
    notifier.ready(server._status_text())
    await stop.wait()
    await server.shutdown()
    if control is not None:
        await control.close()
    for task in tasks:
        task.cancel()
    server.metrics.close()
    await registry.close()
    log.info("server.stopped")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="msgd", description="MSGin5G Server daemon (TS 23.554 Non-MSGin5G UE registration)"
    )
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    parser.add_argument(
        "--check-config", action="store_true", help="load and check the configuration, then exit"
    )
    parser.add_argument("--log-level", help="override [log] level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"msgd: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log.level)
    if args.check_config:
        print(f"msgd: {args.config}: ok")
        return 0
    try:
        ssl_context = server_context(config.tls)
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

        return uvloop.run(serve(config, registry, ssl_context, notifier))
    finally:
        notifier.close()


if __name__ == "__main__":
    raise SystemExit(main())
