"""What this machine allows, measured in the same run as msgd, so that results are ratios.

* sqlite_insert: the obvious durable table, `(ue TEXT PRIMARY KEY, gateway TEXT, profile BLOB)`,
  n rows of random 20-40 octet text keys, batches of 10,000 rows per transaction, WAL, the
  same `synchronous` as msgd's registry. Rows/s.
* tls_stream: TLS 1.3 bulk throughput over loopback, one sender process, one receiver process
  (AES-GCM as negotiated by default). MB/s (10^6 octets).
* tls_handshake: mutual-TLS handshakes/s (the same certificates, P-256) against a raw blocking
  `ssl` server in its own process (four threads: OpenSSL computes without the GIL), several
  client threads in this one.
* fsync: latency of write(4 KiB) + fsync on the registry's file system, what every durable
  answer waits for at least once (synchronous=full syncs the WAL on each group commit): the
  floor under single-registration latency.
* tls_idle_memory: RSS per idle server-side TLS 1.3 connection in Python's `ssl` (SSLObject
  and its two memory BIOs after a mutual handshake and one record), in a fresh process: the
  floor under msgd's memory per connection, whatever msgd itself keeps.

The server halves run as `python -m bench.ceilings tls-sink|tls-accept ...` children.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import ue_ids


def sqlite_insert(path: Path, n: int, synchronous: str, batch: int = 10_000) -> dict[str, Any]:
    ids = ue_ids("ceiling-sqlite", n)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    conn.execute("CREATE TABLE reg(ue TEXT PRIMARY KEY, gateway TEXT NOT NULL, profile BLOB)")
    started = time.perf_counter()
    for start in range(0, n, batch):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO reg VALUES (?, ?, NULL)",
            ((ue, "gw-bulk") for ue in ids[start : start + batch]),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"n": n, "synchronous": synchronous, "wall_s": elapsed, "rows_per_s": n / elapsed}


def fsync_latency(directory: Path, count: int) -> dict[str, Any]:
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    latencies = []
    try:
        for _ in range(count):
            os.write(fd, b"\x00" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    latencies.sort()

    def at(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"count": count, "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": latencies[-1] * 1000}


def _server_ctx(pki: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def _client_ctx(pki: dict[str, str], identity: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(pki["ca"])
    ctx.load_cert_chain(f"{pki['dir']}/{identity}.pem", f"{pki['dir']}/{identity}.key")
    return ctx


def _child(role: str, pki: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceilings", role, json.dumps(pki)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, port


def _sink(pki: dict[str, str]) -> None:
    """Child: accept one TLS connection, read until EOF, print the octets received."""
    ctx = _server_ctx(pki)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        print(lsock.getsockname()[1], flush=True)
        sock, _ = lsock.accept()
        with ctx.wrap_socket(sock, server_side=True) as tls:
            total = 0
            buf = bytearray(1 << 18)
            while n := tls.recv_into(buf):
                total += n
            print(total, flush=True)


def _acceptor(pki: dict[str, str], threads: int = 4) -> None:
    """Child: complete mutual-TLS handshakes, forever (killed when done).

    Several threads (OpenSSL releases the GIL while it computes) so that the ceiling is the
    CPU, not one handshake's round trips at a time.
    """
    ctx = _server_ctx(pki)
    lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(lsock.getsockname()[1], flush=True)

    def serve() -> None:
        while True:
            sock, _ = lsock.accept()
            try:
                tls = ctx.wrap_socket(sock, server_side=True)
                tls.close()
            except (ssl.SSLError, OSError):
                sock.close()

    workers = [threading.Thread(target=serve, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _idle_memory(pki: dict[str, str]) -> None:
    """Child: read `count identity` on stdin, hold that many server-side TLS objects, print
    the RSS they cost per connection."""
    count, identity = sys.stdin.readline().split()
    server = _server_ctx(pki)
    client = _client_ctx(pki, identity)
    held = []

    def one() -> None:
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        s = server.wrap_bio(s_in, s_out, server_side=True)
        c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
        for _ in range(10):
            done = 0
            for obj, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
                try:
                    obj.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
                peer_in.write(out.read())
            if done == 2:
                break
        c.write(b"HELLO" * 20)
        s_in.write(c_out.read())
        s.read(1000)
        held.append((s, s_in, s_out))

    for _ in range(100):  # warm the allocator and OpenSSL's caches first
        one()
    gc.collect()
    base = _rss()
    for _ in range(int(count)):
        one()
    gc.collect()
    print((_rss() - base) / int(count), flush=True)


def tls_idle_memory(pki: dict[str, str], identity: str, count: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceilings", "tls-memory", json.dumps(pki)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(f"{count} {identity}\n", timeout=600)
    return {"connections": count, "rss_per_connection": float(out.strip().splitlines()[-1])}


def tls_stream(pki: dict[str, str], identity: str, seconds: float) -> dict[str, Any]:
    proc, port = _child("tls-sink", pki)
    ctx = _client_ctx(pki, identity)
    chunk = b"\x5a" * (1 << 16)
    sent = 0
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        version = tls.version()
        cipher = tls.cipher()[0]  # type: ignore[index]
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(64):
                tls.sendall(chunk)
            sent += 64 * len(chunk)
        # FIN, not close: closing with unread data (the server's session tickets) would send
        # a reset and lose what is still in flight.
        tls.shutdown(socket.SHUT_WR)
        assert proc.stdout is not None
        received = int(proc.stdout.readline())
        elapsed = time.perf_counter() - started
    proc.wait(10)
    return {
        "version": version,
        "cipher": cipher,
        "octets": received,
        "wall_s": elapsed,
        "mb_per_s": received / elapsed / 1e6,
        "ok": received == sent,
    }


def tls_handshake(
    pki: dict[str, str], identity: str, seconds: float, threads: int = 4
) -> dict[str, Any]:
    proc, port = _child("tls-accept", pki)
    ctx = _client_ctx(pki, identity)
    counts = [0] * threads
    failures = [0] * threads
    deadline = time.perf_counter() + seconds

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                with (
                    socket.create_connection(("127.0.0.1", port)) as sock,
                    ctx.wrap_socket(sock, server_hostname="localhost") as tls,
                    # TLS 1.3: the server checks our certificate after the client's handshake
                    # returns; waiting for its close counts only handshakes it completed.
                    contextlib.suppress(ssl.SSLError, OSError),
                ):
                    tls.recv(1)
                counts[index] += 1
            except (ssl.SSLError, OSError):
                failures[index] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    proc.kill()
    proc.wait()
    return {
        "handshakes": sum(counts),
        "failures": sum(failures),
        "wall_s": elapsed,
        "per_s": sum(counts) / elapsed,
        "client_threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="server halves of the TLS ceilings")
    parser.add_argument("role", choices=("tls-sink", "tls-accept", "tls-memory"))
    parser.add_argument("pki", help="JSON: dir, ca, server_cert, server_key")
    args = parser.parse_args(argv)
    pki = json.loads(args.pki)
    if args.role == "tls-sink":
        _sink(pki)
    elif args.role == "tls-memory":
        _idle_memory(pki)
    else:
        _acceptor(pki)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
