"""Real msgd instances for tests: a config dir, provisioned UEs, an in-process or child server.

Everything is real: TLS with certificates made for the test run (tests/pki.py), a SQLite file
in tmp_path, sockets on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from msgd.config import Config, load_config
from msgd.gateway import GatewayClient, GatewayUe, client_context
from msgd.registry.provisioning import read_provisioning_csv
from msgd.registry.service import open_registry
from msgd.registry.store import Registry
from msgd.server.daemon import Server
from msgd.tls.contexts import load_server_tls
from tests.pki import Pki

ROOT = Path(__file__).resolve().parent.parent
# For the secret scan at the end of the session (tests/ops/secret_scan.py): every K_ue the
# tests provision, and every log file a msgd child process writes.
SECRETS: set[bytes] = set()
LOG_FILES: list[Path] = []


@dataclass
class Gw:
    identity: str
    ue_authentication: bool = True
    bulk_allowed: bool = True


@dataclass
class Deployment:
    """A config directory for one msgd: msgd.toml, ues.csv, registry path."""

    dir: Path
    pki: Pki
    config_path: Path
    keys: dict[str, bytes] = field(default_factory=dict)

    def config(self) -> Config:
        return load_config(self.config_path)

    def ue(self, uid: str, *, key: bytes | None = None, with_key: bool = True) -> GatewayUe:
        return GatewayUe(uid, (key or self.keys[uid]) if with_key else None)

    def client_ctx(self, identity: str = "gw1.example"):
        return client_context(str(self.pki.gateway_cert(identity)),
                              str(self.pki.gateway_key(identity)), str(self.pki.ca))

    def set_crl(self, crl: Path) -> None:
        """Point [tls] crl at `crl` in msgd.toml (for a reload to pick up)."""
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace("[registry]", f'crl = "{crl}"\n[registry]', 1))

    def write_provisioning(self, rows: Iterable[tuple[str, bytes, Sequence[str]]]) -> None:
        lines = ["ue_service_id,key,gateways"]
        for uid, key, gws in rows:
            self.keys[uid] = key
            SECRETS.add(key)
            lines.append(f"{uid},{key.hex()},{';'.join(gws)}")
        path = self.dir / "ues.csv"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)


def make_deployment(
    tmp: Path,
    pki: Pki,
    *,
    ues: dict[str, Sequence[str]] | None = None,
    gateways: Sequence[Gw] = (Gw("gw1.example"), Gw("gw2.example")),
    limits: dict[str, object] | None = None,
    listen: str = "127.0.0.1:0",
    extra: str = "",
) -> Deployment:
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / "msgd.toml"
    limit_lines = "\n".join(f"{k} = {v}" for k, v in (limits or {}).items())
    gw_lines = "\n".join(
        f'[[gateways]]\nidentity = "{g.identity}"\nue_authentication = '
        f'{str(g.ue_authentication).lower()}\nbulk_allowed = {str(g.bulk_allowed).lower()}\n'
        for g in gateways)
    config_path.write_text(f"""
[server]
listen = "{listen}"
node_name = "msgd-test"
[tls]
certificate = "{pki.server_cert}"
private_key = "{pki.server_key}"
gateway_ca = "{pki.ca}"
[registry]
path = "registry.sqlite"
[provisioning]
file = "ues.csv"
[limits]
{limit_lines}
{extra}
{gw_lines}
""")
    dep = Deployment(tmp, pki, config_path)
    dep.write_provisioning(
        (uid, secrets.token_bytes(32), gws) for uid, gws in (ues or {}).items())
    return dep


def demo_deployment(state_dir: Path) -> Deployment:
    """The directory `msgctl demo init` made, with every listen address moved to
    127.0.0.1:0 (tests never depend on 7554 or 9554 being free); for ChildServer."""
    state_dir = Path(state_dir).resolve()  # ChildServer runs msgd from the repository root
    config_path = state_dir / "msgd.toml"
    text = re.sub(r'(?m)^listen = ".*"$', 'listen = "127.0.0.1:0"', config_path.read_text())
    config_path.write_text(text)
    return Deployment(state_dir, None, config_path)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_server(dep: Deployment) -> AsyncIterator[Server]:
    """msgd in this event loop (the same code path as the daemon, minus signals)."""
    config = dep.config()
    registry = open_registry(config.registry,
                             max_pending_writes=config.limits.max_pending_writes)
    registry.replace_provisioning(read_provisioning_csv(config.provisioning.file))
    loop = asyncio.get_running_loop()
    registry.start(loop)
    server = Server(config, registry, load_server_tls(config.tls), loop)
    await server.start()
    server.mark_ready()  # as serve() does: READY (a no-op here), and SIGHUP-style reload() runs
    try:
        yield server
    finally:
        await server.shutdown()
        await registry.close()


@contextlib.asynccontextmanager
async def writer_held(registry: Registry) -> AsyncIterator[None]:
    """Hold the registry's writer thread back between two group commits (a writer job that
    waits) for the block: changes queue in memory and none becomes durable until it ends.
    The real writer held, not a mock of the database: for overload tests (a full writer
    queue, deterministically)."""
    running, release = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        release.wait(120)  # bounded: a test that forgets to end the block still ends

    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(None, registry._writer.run_job, hold)
    if not await asyncio.to_thread(running.wait, 30):
        raise TimeoutError("the writer did not take the hold job within 30 s")
    try:
        yield
    finally:
        release.set()
        await job


async def connect(dep: Deployment, server_address: tuple[str, int],
                  identity: str = "gw1.example", **kwargs: object) -> GatewayClient:
    host, port = server_address
    return await GatewayClient.connect(host, port, ssl_context=dep.client_ctx(identity),
                                       server_hostname="localhost", **kwargs)


_LISTENING = re.compile(r"event=server\.listening address=127\.0\.0\.1:(\d+)")


class ChildServer:
    """msgd as a real child process (`python -m msgd --config ...`), for kill -9 and RSS."""

    def __init__(self, dep: Deployment, env: dict[str, str] | None = None, *,
                 provisioning_index: bool = True) -> None:
        self.dep = dep
        # The SQLite registry builds its provisioning index after start and says so; the
        # PostgreSQL backend holds provisioning in memory from the start (no such line).
        self.provisioning_index = provisioning_index
        self.log_path = dep.dir / "msgd.log"
        LOG_FILES.append(self.log_path)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> int:
        # Only lines written by this start count (a restarted server appends to the same log).
        offset = len(self.log_text())
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msgd", "--config", str(self.dep.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        log.close()
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"msgd exited {self.proc.returncode}: {self.log_text()[-2000:]}")
            text = self.log_text()
            match = _LISTENING.search(text, offset)
            # Also wait for the provisioning index (built in the background after start), so
            # a test's RSS baseline includes it and its lookups are the steady-state ones.
            if match and (not self.provisioning_index
                          or self._index_ready(text, match, offset)):
                self.port = int(match.group(1))
                return self.port
            # Polling a log file is waiting for an observable condition, not timing.
            time.sleep(0.02)
        raise TimeoutError("msgd did not start listening")

    @staticmethod
    def _index_ready(text: str, listening: re.Match[str], offset: int) -> bool:
        line_end = text.find("\n", listening.start())
        wanted = re.search(r"provisioned=(\d+)", text[listening.start():line_end])
        counts = {int(n) for n in re.findall(r"provisioning index of (\d+) UEs", text[offset:])}
        return wanted is None or int(wanted.group(1)) in counts

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RawGateway:
    """A gateway speaking raw frames over real TLS, for tests that must break the rules."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.nonce = b""
        self.hello_ack = None

    @classmethod
    async def open(cls, dep: Deployment, address: tuple[str, int],
                   identity: str | None = "gw1.example", *, alpn: bool = True,
                   cert: tuple[Path, Path] | None = None) -> RawGateway:
        from msgd.tls.contexts import client_context as ctx_factory

        if cert is None and identity is not None:
            cert = (dep.pki.gateway_cert(identity), dep.pki.gateway_key(identity))
        ctx = ctx_factory(cert[0] if cert else None, cert[1] if cert else None, dep.pki.ca,
                          alpn_protocols=("msgin5g-gw/1",) if alpn else ())
        reader, writer = await asyncio.open_connection(
            address[0], address[1], ssl=ctx, server_hostname="localhost", limit=1 << 24)
        return cls(reader, writer)

    async def hello(self, tid: int = 1, max_frame_size: int | None = None):
        from wire.messages import Hello, HelloAck, encode_message

        self.writer.write(encode_message(Hello(tid, 2, node_name="raw",
                                               max_frame_size=max_frame_size)))
        ack = await self.read_message()
        assert isinstance(ack, HelloAck), ack
        self.nonce = ack.server_nonce
        self.hello_ack = ack
        return ack

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = 10.0) -> tuple[int, int, int, bytes]:
        """(type, flags, tid, body) of the next frame; EOFError when the server closed."""
        async with asyncio.timeout(timeout):
            try:
                header = await self.reader.readexactly(12)
            except asyncio.IncompleteReadError as exc:
                raise EOFError("server closed the connection") from exc
            length = int.from_bytes(header[8:12], "big")
            body = await self.reader.readexactly(length)
        return (header[1], int.from_bytes(header[2:4], "big"),
                int.from_bytes(header[4:8], "big"), body)

    async def read_message(self, timeout: float = 10.0):
        """The next non-bulk message, decoded."""
        from wire.constants import MessageType
        from wire.messages import decode_body

        mtype, _flags, tid, body = await self.read_frame(timeout)
        return decode_body(MessageType(mtype), tid, body)

    async def expect_eof(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    return
                if not data:
                    return

    def close(self) -> None:
        self.writer.close()
