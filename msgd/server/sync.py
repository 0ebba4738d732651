"""Answering wire v1.1 DIGEST / LIST REQUESTs on a gateway connection (docs/protocol.md §6).

Kept out of connection.py (the hot path) on purpose: a sync request is rare, reads the
registry through `RegistryReads` (durable state only, the same for SQLite and PostgreSQL) and
streams its LIST RESPONSE with back-pressure, waiting while the transport's buffer is full,
like bulk answers. The gateway is the identity of its certificate: it sees only its own UEs.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from msgd.config import GatewayPolicy
from msgd.log import get_logger
from msgd.server.ports import ConnectionHost
from wire.constants import ErrorCause, MessageType
from wire.messages import ListedUe
from wire.session import Session


class SyncConnection(Protocol):
    """What of a GatewayConnection answering a sync request uses."""

    session: Session | None
    policy: GatewayPolicy | None
    server: ConnectionHost
    writable: asyncio.Event  # set while the transport takes more octets

    def _write(self) -> None: ...
    def fail(self, exc: Exception) -> None: ...

_log = get_logger("msgd.sync")
LIST_ENTRIES_PER_WRITE = 256


async def answer_sync(conn: SyncConnection, request: Any, handle: object) -> None:
    """Answer one sync request; never raises (a failure ends only this connection)."""
    try:
        await _answer(conn, request, handle)
    except Exception as exc:  # one connection's failure must not reach the loop
        conn.fail(exc)


async def _answer(conn: SyncConnection, request: Any, handle: object) -> None:
    session = conn.session
    policy = conn.policy
    assert session is not None and policy is not None
    reads = conn.server.reads
    tid = request.transaction_id
    bits = request.bucket_bits
    digest = request.message_type is MessageType.DIGEST_REQUEST
    try:
        if digest:
            digests = await reads.sync_digests(policy.identity, bits)
        else:
            rows = await reads.sync_list(policy.identity, bits, request.buckets)
    except Exception as exc:
        _log.warning("sync.registry_error", gateway=policy.identity, tid=tid,
                     error=type(exc).__name__)
        if session.transaction(tid) is handle:
            session.send_error(tid, ErrorCause.INTERNAL_ERROR, "registry unreadable")
            conn._write()
        return
    if digest:
        session.send_digest_response(tid, bits, digests, handle)
        conn._write()
        return
    if not session.start_list_response(tid, len(rows), handle):
        return
    for start in range(0, len(rows), LIST_ENTRIES_PER_WRITE):
        chunk = [ListedUe(uid, h) for uid, h in rows[start:start + LIST_ENTRIES_PER_WRITE]]
        if not session.send_list_entries(tid, chunk, handle):
            return  # the gateway's ERROR ended it, or the connection closed
        conn._write()
        await conn.writable.wait()
    conn._write()
