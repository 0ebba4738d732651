"""msgd.tls.reads: bytes in through one read buffer per thread, over real TLS on 127.0.0.1.

Several connections of one event loop share the buffer, and two event loops in two threads
run at once: every connection must receive exactly the bytes its peer sent, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
from pathlib import Path

import pytest
import uvloop

from msgd.tls.contexts import client_context, server_context
from msgd.tls.reads import READ_BUFFER_SIZE, TlsReads

try:
    from tests.pki import Pki, make_pki
except ModuleNotFoundError:  # see tests/msgd/test_tls.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.pki import Pki, make_pki

TIMEOUT = 60.0
CONNECTIONS = 4
# More than one read buffer per connection, in records of every size up to TLS's largest.
OCTETS = 3 * READ_BUFFER_SIZE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Collect(TlsReads):
    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.received = bytearray()
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        self.done.set_result(bytes(self.received))
        return False


def payload(thread: int, connection: int) -> bytes:
    seed = f"{thread}/{connection}".encode()
    blocks = (hashlib.sha256(seed + n.to_bytes(4, "big")).digest()
              for n in range(OCTETS // 32))
    return b"".join(blocks)


async def exchange(pki: Pki, thread: int) -> tuple[bool, list[int]]:
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[bytes]] = []

    def protocol() -> Collect:
        futures.append(loop.create_future())
        return Collect(futures[-1])

    server = await loop.create_server(protocol, "127.0.0.1", 0,
                                      ssl=server_context(pki.tls_config()))
    port = server.sockets[0].getsockname()[1]
    context = client_context(pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"),
                             pki.ca)
    sent = [payload(thread, n) for n in range(CONNECTIONS)]

    async def send(data: bytes) -> None:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost")
        size, pos = 1, 0
        while pos < len(data):  # records of 1, 2, 4, ... 16 KiB octets, interleaved
            writer.write(data[pos:pos + size])
            await writer.drain()
            pos += size
            size = 1 if size >= 16_384 else size * 2
        writer.close()  # close_notify: the server's eof_received
        await writer.wait_closed()

    async with server:
        await asyncio.wait_for(asyncio.gather(*(send(data) for data in sent)), TIMEOUT)
        received = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    # Connections are accepted in no set order: match each received stream to a sent one.
    return sorted(received) == sorted(sent), [len(data) for data in received]


def test_connections_and_threads_each_get_their_own_bytes(pki: Pki) -> None:
    results: dict[int, object] = {}

    def run(thread: int) -> None:
        loop = uvloop.new_event_loop()
        try:
            results[thread] = loop.run_until_complete(exchange(pki, thread))
        except BaseException as exc:  # reported below, with the thread it came from
            results[thread] = exc
        finally:
            loop.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(2 * TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "an exchange hung"
    each = (True, [OCTETS] * CONNECTIONS)
    assert results == {0: each, 1: each}
