"""msgd.gateway.transactions.Outstanding, sans-IO: a gateway Session wired to a server Session
in memory (tests/wire/helpers.Pair), no socket, no clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from msgd.gateway.transactions import ConnectionEnding, Outstanding
from tests.wire.helpers import Pair, errors_in
from wire.constants import ErrorCause, MessageType
from wire.messages import RegistrationEntry, UeRegistrationRequest

REG = MessageType.BULK_REGISTRATION_REQUEST


class Owner:
    """A TransactionOwner that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_answer(self, tid: int, *rest: Any) -> None:
        self.calls.append(("answer", tid, *rest))

    def on_end(self, tid: int) -> None:
        self.calls.append(("end", tid))

    def on_failed(self, tid: int, *rest: Any) -> None:
        self.calls.append(("failed", tid, *rest))


class Link:
    """What the connection gives an Outstanding: is_open, flush (collects the octets), on_end."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.open = True
        self.written = b""
        self.ends = 0

    def flush(self) -> None:
        self.written += self.pair.gateway.data_to_send()

    def on_end(self) -> None:
        self.ends += 1


def _table(limit: int = 4) -> tuple[Pair, Link, Outstanding]:
    pair = Pair()
    pair.handshake()
    link = Link(pair)
    table = Outstanding(pair.gateway, is_open=lambda: link.open, flush=link.flush,
                        on_end=link.on_end)
    table.limit = limit
    return pair, link, table


def _half_sent_bulk(pair: Pair, count: int = 3) -> int:
    gw = pair.gateway
    tid = gw.next_transaction_id()
    gw.start_bulk(REG, tid, count)
    gw.send_bulk_entry(tid, RegistrationEntry("ue-1@gw1.example"))
    gw.data_to_send()  # on the wire already
    return tid


async def test_slots_are_counted_and_given_back_when_a_transaction_ends() -> None:
    _pair, link, table = _table(limit=2)
    owner = Owner()
    await table.acquire_slot()
    table.own(10, owner)
    await table.acquire_slot()
    table.own(12, owner)
    assert table.slots_free == 0
    table.end(10)
    assert table.slots_free == 1 and 10 not in table.owners and link.ends == 1
    table.end(10)  # ended twice (the server's end after ours): no slot made up
    assert table.slots_free == 1
    table.release_slot()  # 12's slot, as a run gives back one it started nothing in
    assert table.slots_free == 2


async def test_no_slot_when_full_and_the_connection_stops_taking_transactions() -> None:
    _pair, link, table = _table(limit=1)
    await table.acquire_slot()
    link.open = False
    # The timeout only turns a hang into a failure: acquire_slot must raise at once.
    with pytest.raises(ConnectionEnding):
        async with asyncio.timeout(5):
            await table.acquire_slot()


async def test_abandoning_a_half_sent_bulk_ends_it_with_error_and_frees_its_slot() -> None:
    pair, link, table = _table()
    owner = Owner()
    await table.acquire_slot()
    tid = _half_sent_bulk(pair)
    table.own(tid, owner, bulk=True)
    assert table.sending_bulk == tid
    table.abandon(tid)
    (error,) = errors_in(link.written)
    assert error.transaction_id == tid and error.error_cause == ErrorCause.INTERNAL_ERROR
    assert tid not in table.owners and table.sending_bulk is None
    assert table.slots_free == table.limit and link.ends == 1
    assert tid not in pair.gateway.in_progress()  # a next bulk request may start
    assert owner.calls == []


async def test_abandoning_a_sent_request_drops_its_answers_until_it_ends() -> None:
    pair, link, table = _table()
    owner = Owner()
    await table.acquire_slot()
    gw = pair.gateway
    tid = gw.next_transaction_id()
    gw.send_request(UeRegistrationRequest(tid, "ue-1@gw1.example"))
    table.own(tid, owner)
    table.abandon(tid)
    assert link.written == b""  # nothing to end: the request is complete
    orphan = table.owners[tid]
    assert orphan is not owner and table.slots_free == table.limit - 1
    orphan.on_answer(tid, 0, None, None)  # what the connection does with its answer
    orphan.on_end(tid)
    assert tid not in table.owners and table.slots_free == table.limit
    assert owner.calls == []


async def test_a_bulk_sent_in_full_is_not_ended_by_error_when_abandoned() -> None:
    pair, link, table = _table()
    await table.acquire_slot()
    gw = pair.gateway
    tid = gw.next_transaction_id()
    gw.start_bulk(REG, tid, 1)
    gw.send_bulk_entry(tid, RegistrationEntry("ue-1@gw1.example"))
    table.own(tid, Owner(), bulk=True)
    table.bulk_sent(tid)
    assert table.sending_bulk is None
    table.abandon(tid)
    assert errors_in(link.written) == [] and tid in table.owners  # its answers still come


async def test_clear_forgets_every_transaction() -> None:
    pair, _link, table = _table(limit=2)
    await table.acquire_slot()
    await table.acquire_slot()
    tid = _half_sent_bulk(pair)
    table.own(tid, Owner(), bulk=True)
    table.own(tid + 2, Owner())
    table.clear()
    assert table.owners == {} and table.sending_bulk is None and table.slots_free == 2
