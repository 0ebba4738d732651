"""The floor under a single request that arrives alone: a TLS echo on uvloop (not a test).

    python -m bench.tls_echo_floor [--rates 2000,6000,20000] [--connections 100] [--durable]

A server process answers every 100-octet record with 60 octets at once (reading through
msgd's own TlsReads, as msgd's connections do); a client process holds `connections` TLS
1.3 connections and sends at a total rate, each connection a Poisson process of its own, as
the benchmark's load generator does. Prints one JSON line per rate: the server process's CPU
per request (its handshakes subtracted, measured apart) and the client's round-trip p50/p99.
`python -m bench --scenarios lone` runs it beside msgd's singles at the same rates (bench/lone.py).

`--durable` is the floor of a durable single instead: what a registration needs at the
least, written in plain CPython the way batch_floor.py writes a bulk entry. Per record the
server verifies an HMAC-SHA256 proof from its UE's precomputed key states, marks the UE in a
dict and queues it; one writer thread commits what is queued as one SQLite row (WAL,
synchronous FULL, the group commit of msgd's writer with the daemon's defaults: a wait of
COMMIT_INTERVAL while the queue is short, at most MAX_BATCH per row; no checkpoint in the
writer, as in msgd) and only then has the loop send the answers. Its p99 and CPU count every
request sent: one never answered is slower than any answer. The registered scenario runs it at
the half-load rate, as the ceiling of that p99 (bench/scenarios.py). `--extra-us N` adds
fixed Python work per request, N µs at the fastest the server measured it at its start, so
that it slows with the vCPU as real work does: where the floor's p99 crosses a target says
how much a server may spend per lone single. N is nominal (a VM slowed all through that
calibration makes it up to ~2 × less): read the server CPU per request the run reports.

Throwaway self-signed P-256 key in a temporary directory, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import math
import select
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from bench.hostcpu import process_cpu_s
from bench.loadgen import PoissonArrivals, percentile
from msgd.registry.store import COMMIT_INTERVAL, MAX_BATCH
from msgd.registry.writer import gather_below
from msgd.tls.reads import TlsReads

REQUEST, ANSWER = 100, 60
# The durable floor's record: UE number (4 octets), its 32-octet identity stand-in, the proof
# over NONCE + identity (32 octets), padding to REQUEST. Answers: ACCEPTED or REFUSED octets.
FLOOR_UES = 1000
NONCE = bytes(32)
ACCEPTED, REFUSED = b"a" * ANSWER, b"r" * ANSWER
SYNCHRONOUS = ("FULL", "NORMAL")
GATHER_BELOW = gather_below(MAX_BATCH)
LISTEN_TIMEOUT_S = 120.0
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _floor_key(ue: int) -> bytes:
    return hashlib.sha256(b"floor-ue-%d" % ue).digest()


def floor_record(ue: int) -> bytes:
    """A durable-floor request for UE `ue` with a valid proof."""
    identity = hashlib.sha256(b"floor-id-%d" % ue).digest()
    proof = hmac.digest(_floor_key(ue), NONCE + identity, "sha256")
    return (ue.to_bytes(4, "big") + identity + proof).ljust(REQUEST, b"\0")


class _Echo(TlsReads):
    """Reads as msgd's connections do (msgd.tls.reads), answers each whole request at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pending = 0

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        whole, self.pending = divmod(self.pending, REQUEST)
        if whole:
            self.transport.write(b"a" * ANSWER * whole)  # type: ignore[attr-defined]


class _GroupCommit(threading.Thread):
    """The durable floor's writer: each round commits the queued changes as one row."""

    def __init__(self, database: Path, loop: asyncio.AbstractEventLoop,
                 synchronous: str) -> None:
        super().__init__(name="floor-writer", daemon=True)
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        self.conn.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, ues BLOB NOT NULL)")
        self.loop = loop
        self.queued: deque[tuple[int, _DurableFloor]] = deque()
        self.wake = threading.Event()
        self.idle = False

    def run(self) -> None:
        try:
            self._commit_rounds()
        except BaseException:
            # A floor that cannot commit must not look like a slow one: the server stops.
            traceback.print_exc()
            self.loop.call_soon_threadsafe(self.loop.stop)

    def _commit_rounds(self) -> None:
        queued = self.queued
        while True:
            self.wake.clear()
            if not queued:
                # Set before the re-check, read by the loop after it queues: no lost wake-up.
                self.idle = True
                if not queued:
                    self.wake.wait()
                self.idle = False
                continue
            if len(queued) < GATHER_BELOW:
                time.sleep(COMMIT_INTERVAL)
            batch = [queued.popleft() for _ in range(min(len(queued), MAX_BATCH))]
            self.conn.execute("INSERT INTO journal (ues) VALUES (?)",
                              (b"".join(ue.to_bytes(4, "big") for ue, _ in batch),))
            self.loop.call_soon_threadsafe(_answer_durable, batch)


def _answer_durable(batch: list[tuple[int, _DurableFloor]]) -> None:
    owed: dict[_DurableFloor, int] = {}
    for _ue, connection in batch:
        owed[connection] = owed.get(connection, 0) + 1
    for connection, count in owed.items():
        connection.transport.write(ACCEPTED * count)  # type: ignore[attr-defined]


@dataclass
class _FloorState:
    """What the durable floor's connections share."""

    writer: _GroupCommit
    states: list[tuple[Any, Any]]  # each UE's HMAC key states (inner, outer)
    extra_loops: int = 0  # iterations of an empty loop per request (--extra-us)
    registered: dict[int, bool] = field(default_factory=dict)


class _DurableFloor(TlsReads):
    """Verifies, applies and queues each whole record; answers once the writer committed."""

    def __init__(self, floor: _FloorState) -> None:
        self.floor = floor
        self.partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.partial:
            data = self.partial + data
        whole = len(data) // REQUEST
        self.partial = data[whole * REQUEST:]
        floor = self.floor
        states, registered, queued = floor.states, floor.registered, floor.writer.queued
        extra = floor.extra_loops
        refused = 0
        for start in range(0, whole * REQUEST, REQUEST):
            ue = int.from_bytes(data[start:start + 4], "big")
            if ue >= FLOOR_UES:
                refused += 1
                continue
            inner, outer = states[ue]
            digest = inner.copy()
            digest.update(NONCE + data[start + 4:start + 36])
            proof = outer.copy()
            proof.update(digest.digest())
            if not hmac.compare_digest(proof.digest(), data[start + 36:start + 68]):
                refused += 1
                continue
            registered[ue] = True
            queued.append((ue, self))
            if extra:
                for _ in range(extra):
                    pass
        if refused:
            self.transport.write(REFUSED * refused)  # type: ignore[attr-defined]
        if whole > refused and floor.writer.idle:
            floor.writer.wake.set()


def _loops_per_us() -> float:
    """Iterations of an empty Python loop per µs at the fastest of 200 short tries (a slowed
    vCPU only makes a try slower)."""
    best = float("inf")
    for _ in range(200):
        started = time.perf_counter()
        for _ in range(20_000):
            pass
        best = min(best, time.perf_counter() - started)
    return 20_000 / (best * 1e6)


def _key_states(key: bytes) -> tuple[Any, Any]:
    padded = key.ljust(64, b"\0")
    return hashlib.sha256(padded.translate(_IPAD)), hashlib.sha256(padded.translate(_OPAD))


async def _serve(cert: Path, key: Path, database: Path | None = None,
                 synchronous: str = "FULL", extra_us: float = 0.0) -> None:
    """The server process (`--serve CERT KEY [--database PATH ...]`): prints its port,
    answers until killed; with a database, as the durable floor."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    protocol: Any = _Echo
    if database is not None:
        floor = _FloorState(_GroupCommit(database, loop, synchronous),
                            [_key_states(_floor_key(ue)) for ue in range(FLOOR_UES)])
        if extra_us:
            floor.extra_loops = round(extra_us * _loops_per_us())
        floor.writer.start()
        protocol = functools.partial(_DurableFloor, floor)
    server = await loop.create_server(protocol, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


class _Client(asyncio.Protocol):
    """One connection of the load: the due time of each request in flight, answered in order.
    Given `refill` (closed loop), each answer has the next request sent at once, in a write of
    its own, as the benchmark's closed-loop gateways do (bench/loadgen.py)."""

    def __init__(self, latencies: list[float],
                 refill: Callable[[_Client], None] | None = None) -> None:
        self.latencies = latencies
        self.refill = refill
        self.measure_from = -math.inf  # round trips of requests due earlier are not kept
        self.sent: deque[float] = deque()
        self.received = 0
        self.refused_octets = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.refused_octets += data.count(REFUSED[:1])
        now = time.perf_counter()
        refill = self.refill
        while self.received >= ANSWER and self.sent:
            self.received -= ANSWER
            due = self.sent.popleft()
            if due >= self.measure_from:
                self.latencies.append(now - due)
            if refill is not None:
                refill(self)


async def _connect(port: int, count: int, make: Callable[[], _Client]) -> list[_Client]:
    """`count` TLS connections to the floor server on 127.0.0.1, one `make()` client each."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the throwaway certificate; nothing leaves 127.0.0.1
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        _transport, client = await loop.create_connection(make, "127.0.0.1", port, ssl=context)
        clients.append(client)
    return clients


async def _drive(port: int, rate: float, count: int, seconds: float,
                 records: list[bytes], warmup: float = 0.0,
                 measuring: Callable[[], None] | None = None) -> tuple[int, list[float], int]:
    """Sends `records` in turn at `rate` for `warmup` + `seconds`; returns what fell due
    after the warm-up, the sorted round trips of those, and how many answers said REFUSED.
    `measuring` is called once the warm-up is over. Answers are matched to requests in
    order: right for the echo and for a floor that accepts all (the benchmark's records); a
    refusal answered ahead of accepted requests waiting for their commit would swap their
    round trips."""
    latencies: list[float] = []
    clients = await _connect(port, count, lambda: _Client(latencies))
    start = time.perf_counter()
    measure_from = start + warmup
    for client in clients:
        client.measure_from = measure_from
    arrivals = PoissonArrivals("tls-echo", count, rate / count, start)
    sent = measured = 0
    waiting = measuring
    while (now := time.perf_counter()) < measure_from + seconds:
        if waiting is not None and now >= measure_from:
            waiting()
            waiting = None
        for index, client in enumerate(clients):
            before = len(client.sent)
            arrivals.take(index, now, client.sent)  # latency counts from each due time
            for due in itertools.islice(client.sent, before, None):
                client.transport.write(records[sent % len(records)])  # type: ignore[attr-defined]
                sent += 1
                measured += due >= measure_from
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.5)
    for client in clients:
        client.transport.close()
    return measured, sorted(latencies), sum(c.refused_octets for c in clients) // ANSWER


async def _saturate(port: int, count: int, window: int, seconds: float, warmup: float,
                    records: list[bytes]) -> tuple[int, int, float, list[float]]:
    """Closed loop: `count` connections each keep `window` requests in flight for `warmup` +
    `seconds`; returns the requests sent and the answers received when it stopped sending,
    the answers per second after the warm-up, and the sorted round trips of those answers."""
    latencies: list[float] = []
    sent = 0

    def send(client: _Client) -> None:
        nonlocal sent
        client.sent.append(time.perf_counter())
        client.transport.write(records[sent % len(records)])  # type: ignore[attr-defined]
        sent += 1

    clients = await _connect(port, count, lambda: _Client(latencies, send))
    for client in clients:
        for _ in range(window):
            send(client)
    await asyncio.sleep(warmup)  # the measured window is a span of time, not a condition
    first = len(latencies)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    answered = len(latencies) - first
    per_s = answered / (time.perf_counter() - started)
    for client in clients:
        client.refill = None
    total = len(latencies)
    for client in clients:
        client.transport.close()
    return sent, total, per_s, sorted(latencies[first:first + answered])


def saturated(count: int, window: int, seconds: float, cert: Path, key: Path,
              database: Path | None = None, synchronous: str = "FULL", extra_us: float = 0.0,
              warmup: float = 1.0) -> dict[str, Any]:
    """The floor in closed loop, as the benchmark measures msgd's saturated singles: `count`
    connections, `window` requests in flight on each; its answers per second after `warmup`,
    their round trips, and the server's CPU per answered request (handshakes included: a
    few hundred µs against seconds of load)."""
    records = _records(database)
    with serving(cert, key, database, synchronous, extra_us) as (server, port):
        before = process_cpu_s(server.pid)
        sent, answered, per_s, latencies = uvloop.run(
            _saturate(port, count, window, seconds, warmup, records))
        cpu = process_cpu_s(server.pid) - before
    out: dict[str, Any] = {
        "closed_loop": True, "connections": count, "window": window,
        "requests": sent, "answered": answered, "per_s": round(per_s, 1),
        "server_cpu_us_per_request": round(cpu / answered * 1e6, 1) if answered else None,
        **percentiles_ms(latencies, len(latencies)),
    }
    if database is not None:
        out.update(durable=True, journaled=journaled(database))
    return out


def _records(database: Path | None) -> list[bytes]:
    """What the load sends: the durable floor's records (valid proofs), or the echo's."""
    return ([floor_record(ue) for ue in range(FLOOR_UES)] if database is not None
            else [b"q" * REQUEST])


def journaled(database: Path) -> int:
    """UEs the durable floor committed (its journal rows hold 4 octets per UE)."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return int(conn.execute("SELECT COALESCE(SUM(LENGTH(ues)), 0) / 4 FROM journal")
                   .fetchone()[0])


@contextlib.contextmanager
def serving(cert: Path, key: Path, database: Path | None = None, synchronous: str = "FULL",
            extra_us: float = 0.0) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The server process and its port: the echo, or with a database (a new file) the durable
    floor, committing with PRAGMA synchronous=`synchronous`, `extra_us` of work more per
    request. Killed on leaving."""
    command = [sys.executable, "-m", "bench.tls_echo_floor", "--serve", str(cert), str(key)]
    if database is not None:
        if database.exists():
            raise FileExistsError(f"{database}: the durable floor journals into a new file")
        command += ["--database", str(database), "--synchronous", synchronous,
                    "--extra-us", str(extra_us)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                          cwd=Path(__file__).resolve().parents[1]) as server:
        try:
            assert server.stdout is not None
            ready, _, _ = select.select([server.stdout], [], [], LISTEN_TIMEOUT_S)
            line = server.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"floor server ({' '.join(command[2:4])}) not listening "
                                   f"within {LISTEN_TIMEOUT_S:.0f} s (exit code {server.poll()})")
            yield server, int(line)
            if server.poll() is not None:  # a run that ended without its server
                raise RuntimeError(f"the floor server exited {server.returncode} during the run")
        finally:
            server.kill()


def percentiles_ms(latencies: list[float], sent: int) -> dict[str, float | None]:
    """p50, p99 and p99.9 in ms of the sorted round trips `latencies` of `sent` requests: one
    never answered is slower than any answer (None where a percentile falls on one)."""
    every = latencies + [math.inf] * (sent - len(latencies))  # still sorted
    out: dict[str, float | None] = {}
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("p999_ms", 0.999)):
        value = percentile(every, q)
        out[name] = round(value * 1000, 2) if math.isfinite(value) else None
    return out


def measure(rate: float, count: int, seconds: float, cert: Path, key: Path,
            database: Path | None = None, synchronous: str = "FULL",
            extra_us: float = 0.0, warmup: float = 0.0) -> dict[str, Any]:
    """One rate: the server's CPU per answered request and the round trips, a request
    never answered counting as slower than any; both from the end of `warmup` (the
    connections' handshakes come before it). With a database (a new file), the durable floor
    instead of the echo."""
    records = _records(database)
    with serving(cert, key, database, synchronous, extra_us) as (server, port):
        marks: list[float] = []
        sent, latencies, refused = uvloop.run(_drive(
            port, rate, count, seconds, records, warmup,
            lambda: marks.append(process_cpu_s(server.pid))))
        cpu = process_cpu_s(server.pid) - marks[0]
    answered = len(latencies)
    out: dict[str, Any] = {
        "rate": rate,
        "connections": count,
        "warmup_s": warmup,
        "requests": sent,
        "answered": answered,
        "server_cpu_us_per_request": round(cpu / answered * 1e6, 1) if answered else None,
        **percentiles_ms(latencies, sent),
    }
    if database is not None:
        out.update(durable=True, synchronous=synchronous, extra_us=extra_us, refused=refused,
                   journaled=journaled(database))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2000,6000,20000")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--durable", action="store_true",
                        help="the durable floor (HMAC, dict, SQLite group commit) instead")
    parser.add_argument("--extra-us", type=float, default=0.0,
                        help="with --durable: µs of fixed work more per request")
    parser.add_argument("--synchronous", choices=SYNCHRONOUS, default="FULL",
                        help="with --durable: the floor's PRAGMA synchronous")
    parser.add_argument("--half-of-saturated", action="store_true",
                        help="the benchmark's half-load test on the floor itself: closed loop "
                             "(--window per connection) to its saturated rate, then open loop "
                             "at half that rate (--rates is not used)")
    parser.add_argument("--window", type=int, default=64,
                        help="with --half-of-saturated: requests in flight per connection "
                             "(the benchmark's gateways keep msgd's max_outstanding)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of load before the measured ones (as the benchmark's "
                             "load generator)")
    parser.add_argument("--serve", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--database", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve(Path(args.serve[0]), Path(args.serve[1]), args.database,
                          args.synchronous, args.extra_us))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(pki / "key.pem"), "-out", str(pki / "cert.pem"),
             "-subj", "/CN=localhost", "-days", "1"], check=True, capture_output=True)
        if args.half_of_saturated:
            database = pki / "floor-saturated.sqlite" if args.durable else None
            full = saturated(args.connections, args.window, args.seconds, pki / "cert.pem",
                             pki / "key.pem", database, args.synchronous, args.extra_us,
                             args.warmup)
            print(json.dumps(full), flush=True)
            database = pki / "floor-half.sqlite" if args.durable else None
            print(json.dumps(measure(max(1.0, full["per_s"] / 2), args.connections,
                                     args.seconds, pki / "cert.pem", pki / "key.pem", database,
                                     args.synchronous, args.extra_us, args.warmup)), flush=True)
            return 0
        for index, rate in enumerate(float(text) for text in args.rates.split(",")):
            database = pki / f"floor-{index}.sqlite" if args.durable else None
            print(json.dumps(measure(rate, args.connections, args.seconds, pki / "cert.pem",
                                     pki / "key.pem", database, args.synchronous,
                                     args.extra_us, args.warmup)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
