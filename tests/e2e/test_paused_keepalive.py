"""msgd stops reading from a gateway whose answers fill its window; while its registry is slow,
that gateway's silence is msgd's own, and the keepalive must not end the session for it.

Found by the connection fuzz target (msgd/server/fuzz.py, docs/survival.md "Fuzzing"): with
bulk_window answers waiting on the registry, reading was paused, the gateway's KEEPALIVE ACK
waited unread in the socket, and two keepalive intervals later msgd sent ERROR(IDLE_TIMEOUT)
and closed a healthy session, dropping the answers it owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

from tests.harness import Gw, RawGateway, make_deployment, running_server
from wire.constants import MessageType, Result
from wire.messages import (
    KeepaliveAck,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_message,
)

KEEPALIVE = 1  # s, the smallest msgd accepts
UES = {"a1@example": ["gw1.example"], "a2@example": ["gw1.example"]}


async def test_keepalive_waits_while_msgd_holds_reading_for_its_registry(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues=UES,
                          gateways=(Gw("gw1.example", ue_authentication=False),),
                          limits={"keepalive_interval": KEEPALIVE, "bulk_window": 1})
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw1.example")
        await raw.hello()
        # Another writer holds the registry's write lock: the commit, and so the answer, waits
        # (the registry's busy timeout is 5 s), and the one answer fills bulk_window = 1.
        lock = sqlite3.connect(dep.dir / "registry.sqlite", timeout=5.0)
        lock.execute("BEGIN IMMEDIATE")
        try:
            await raw.send(encode_message(UeRegistrationRequest(2, "a1@example")))
            # Three keepalive intervals of registry stall: the gateway answers any KEEPALIVE
            # at once; nothing else may come (before the fix: ERROR(IDLE_TIMEOUT) at two).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3 * KEEPALIVE
            while (left := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    mtype, _flags, tid, body = await raw.read_frame(timeout=left)
                    assert mtype == MessageType.KEEPALIVE, (MessageType(mtype).name, body)
                    await raw.send(encode_message(KeepaliveAck(tid)))
        finally:
            lock.rollback()
            lock.close()
        answer = await raw.read_message()
        assert isinstance(answer, UeRegistrationResponse), answer
        assert (answer.transaction_id, answer.result) == (2, Result.SUCCESS)
        # The session goes on: the next request is served.
        await raw.send(encode_message(UeRegistrationRequest(3, "a2@example")))
        answer = await raw.read_message()
        assert isinstance(answer, UeRegistrationResponse), answer
        assert (answer.transaction_id, answer.result) == (3, Result.SUCCESS)
        raw.close()
