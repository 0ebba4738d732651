"""The floor under a single request that arrives alone: a TLS echo on uvloop (not a test).

    python -m bench.tls_echo_floor [--rates 2000,6000,20000] [--connections 100]

A server process answers every 100-octet record with 60 octets at once (reading through
msgd's own TlsReads, as msgd's connections do); a client process holds `connections` TLS
1.3 connections and sends at a total rate, each connection a Poisson process of its own, as
the benchmark's load generator does. Prints one JSON line per rate: the server process's CPU
per request (its handshakes subtracted, measured apart) and the client's round-trip p50/p99.
`python -m bench --scenarios lone` runs it beside msgd's singles at the same rates (bench/lone.py).
Throwaway self-signed P-256 key in a temporary directory, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import uvloop

from bench.loadgen import PoissonArrivals
from msgd.tls.reads import TlsReads

REQUEST, ANSWER = 100, 60


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


async def _serve(cert: Path, key: Path) -> None:
    """The server process (`--serve CERT KEY`): prints its port, echoes until killed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0, ssl=context)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


class _Client(asyncio.Protocol):
    def __init__(self, latencies: list[float]) -> None:
        self.latencies = latencies
        self.sent: deque[float] = deque()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        now = time.perf_counter()
        while self.received >= ANSWER and self.sent:
            self.received -= ANSWER
            self.latencies.append(now - self.sent.popleft())


async def _drive(port: int, rate: float, count: int, seconds: float) -> tuple[int, list[float]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the throwaway certificate; nothing leaves 127.0.0.1
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    clients = []
    for _ in range(count):
        _transport, client = await loop.create_connection(
            lambda: _Client(latencies), "127.0.0.1", port, ssl=context)
        clients.append(client)
    start = time.perf_counter()
    arrivals = PoissonArrivals("tls-echo", count, rate / count, start)
    sent = 0
    while (now := time.perf_counter()) < start + seconds:
        for index, client in enumerate(clients):
            before = len(client.sent)
            arrivals.take(index, now, client.sent)  # latency counts from each due time
            for _ in range(len(client.sent) - before):
                client.transport.write(b"q" * REQUEST)  # type: ignore[attr-defined]
                sent += 1
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.5)
    for client in clients:
        client.transport.close()
    return sent, sorted(latencies)


def cpu_s(pid: int) -> float:
    """CPU seconds of a process's live threads, to the nanosecond (/proc/<pid>/stat counts in
    10 ms ticks: too coarse for a few hundred requests)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def measure(rate: float, count: int, seconds: float, cert: Path, key: Path) -> dict[str, Any]:
    """One rate: the server's CPU per request (handshakes apart) and the round trips."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.tls_echo_floor", "--serve", str(cert), str(key)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise RuntimeError(f"TLS echo server exited {server.wait()} before listening")
        port = int(line)
        before = cpu_s(server.pid)
        uvloop.run(_drive(port, 1.0, count, 0.0))  # handshakes alone, to subtract
        handshakes = cpu_s(server.pid) - before
        before = cpu_s(server.pid)
        sent, latencies = uvloop.run(_drive(port, rate, count, seconds))
        cpu = cpu_s(server.pid) - before - handshakes
    finally:
        server.kill()
        server.wait()
    return {
        "rate": rate,
        "connections": count,
        "requests": sent,
        "server_cpu_us_per_request": round(cpu / sent * 1e6, 1) if sent else None,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2000,6000,20000")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.run(_serve(Path(args.serve[0]), Path(args.serve[1])))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(pki / "key.pem"), "-out", str(pki / "cert.pem"),
             "-subj", "/CN=localhost", "-days", "1"], check=True, capture_output=True)
        for rate in (float(text) for text in args.rates.split(",")):
            print(json.dumps(measure(rate, args.connections, args.seconds, pki / "cert.pem",
                                     pki / "key.pem")), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
