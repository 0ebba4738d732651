"""The registry port's contract (msgd.registry.port.Registrar), held by every implementation:
the embedded registry (SQLite file in tmp_path) and PostgreSQL (a real throw-away cluster,
tests/pgcluster.py). Each test states the wire-v1 §5 rule it holds; outcomes are awaited
through the port's own callback, never through sleeps. What only one implementation does
(memory rollback, reconnecting) is tested beside it: tests/msgd/test_registry_port.py,
tests/postgres/.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from msgd.registry.port import SUCCESS, Change, Outcome, Registrar
from msgd.registry.service import RegistryService, make_registrar, reads_for
from msgd.registry.store import Registration, Registry
from wire.constants import FailureCause

NOT_REGISTERED = Outcome(FailureCause.NOT_REGISTERED)
VIA_OTHER = Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)
AUTH_FAILED = Outcome(FailureCause.AUTHENTICATION_FAILED)
STORAGE = Outcome(FailureCause.STORAGE_FAILURE)
BUSY = Outcome(FailureCause.SERVER_BUSY, 500)


class Backend:
    """One registry implementation under test: its port, reads of the committed state, a
    reopen (what survives), and a way to make its storage refuse writes."""

    def __init__(self, kind: str, tmp_path: Path, pg_dsn: str | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.dsn = pg_dsn
        self.registry: RegistryService | None = None

    async def open(self, *, max_pending_writes: int = 10_000) -> Registrar:
        if self.kind == "sqlite":
            self.registry = Registry.open(self.tmp_path / "registry.sqlite")
        else:
            from msgd.registry.postgres import PgRegistry, PgSettings

            assert self.dsn is not None
            self.registry = await asyncio.to_thread(PgRegistry.open, PgSettings(self.dsn))
        self.registry.start(asyncio.get_running_loop())
        return make_registrar(self.registry, max_pending_writes=max_pending_writes)

    async def close(self) -> None:
        if self.registry is not None:
            await self.registry.close()
            self.registry = None

    async def committed(self, ue: str) -> Registration | None:
        """The registration as a reader sees it after a reopen."""
        await self.close()
        await self.open()
        assert self.registry is not None
        return await reads_for(self.registry).lookup(ue)

    async def refuse_big_profiles(self, refuse: bool) -> None:
        """Make storage fail any change carrying a profile over 100 octets (or stop that)."""
        registry = self.registry
        if isinstance(registry, Registry):
            registry._debug_set_max_page_count(None if refuse else 1 << 30)
            return
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            if refuse:
                await conn.execute(
                    "ALTER TABLE msgd_registration ADD CONSTRAINT test_small "
                    "CHECK (coalesce(length(profile), 0) <= 100)")
            else:
                await conn.execute("ALTER TABLE msgd_registration DROP CONSTRAINT test_small")


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request, tmp_path: Path) -> AsyncIterator[Backend]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    subject = Backend(request.param, tmp_path, dsn)
    yield subject
    await subject.close()


class Batch:
    """One submission's outcomes, awaited through the port's callback."""

    def __init__(self, order: list[Batch] | None = None) -> None:
        self.done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.order = order

    def __call__(self, outcomes: Sequence[Outcome]) -> None:
        assert not self.done.done(), "decided twice"
        if self.order is not None:
            self.order.append(self)
        self.done.set_result(list(outcomes))


def submit(port: Registrar, gateway: str, changes: list[Change],
           order: list[Batch] | None = None) -> Batch:
    batch = Batch(order)
    port.submit(gateway, changes, batch)
    return batch


def reg(ue: str, profile: bytes | None = None) -> Change:
    return Change(ue, True, profile)


def dereg(ue: str, verdict: FailureCause | None = None) -> Change:
    return Change(ue, False, None, verdict)


async def test_rules_in_order_and_successes_survive(backend: Backend) -> None:
    """§5: entries are decided in order, as if one after the other (a UE twice in a batch is
    processed twice); the registration check comes before the credential verdict."""
    port = await backend.open()
    outcomes = await submit(port, "gw-a", [
        reg("ue-1", b"\x01"),
        dereg("ue-2"),                                      # never registered
        reg("ue-2"),
        dereg("ue-2", FailureCause.AUTHENTICATION_FAILED),  # registered, credential failed
        dereg("ue-1"),
        dereg("ue-1"),                                      # the entry before removed it
        reg("ue-1", b"\x02"),
        dereg("ue-3", FailureCause.AUTHENTICATION_FAILED),  # not registered comes first
    ]).done
    assert outcomes == [SUCCESS, NOT_REGISTERED, SUCCESS, AUTH_FAILED, SUCCESS,
                        NOT_REGISTERED, SUCCESS, NOT_REGISTERED]
    assert await backend.committed("ue-1") == Registration("ue-1", "gw-a", b"\x02")
    assert await backend.committed("ue-2") == Registration("ue-2", "gw-a", None)
    assert await backend.committed("ue-3") is None


async def test_other_gateway_and_takeover(backend: Backend) -> None:
    """§5: a de-registration through another gateway is REGISTERED_VIA_OTHER_GATEWAY; a
    registration through another gateway takes the UE over."""
    port = await backend.open()
    first = submit(port, "gw-a", [reg("ue-1", b"a")])
    second = submit(port, "gw-b", [dereg("ue-1"), reg("ue-1", b"b"), dereg("ue-1"),
                                   reg("ue-1", b"c")])
    assert await second.done == [VIA_OTHER, SUCCESS, SUCCESS, SUCCESS]
    assert first.done.done() and await first.done == [SUCCESS]
    third = await submit(port, "gw-a", [dereg("ue-1")]).done
    assert third == [VIA_OTHER]
    assert await backend.committed("ue-1") == Registration("ue-1", "gw-b", b"c")


async def test_batches_are_decided_in_submission_order(backend: Backend) -> None:
    """port.Registrar: the batches of one caller are decided, and told, in order; a later
    batch sees every change of the earlier ones."""
    port = await backend.open()
    order: list[Batch] = []
    batches = []
    for i in range(30):
        ue = f"ue-{i // 2 % 3}"  # registered by one batch, de-registered by the next
        batches.append(submit(port, "gw-a", [reg(ue)] if i % 2 == 0 else [dereg(ue)], order))
    results = [await b.done for b in batches]
    assert order == batches
    assert all(r == [SUCCESS] for r in results)


async def test_busy_beyond_the_pending_writes_limit(backend: Backend) -> None:
    """§5 Overload: entries beyond the registry's backlog get SERVER_BUSY with a Retry after,
    before any other cause; once settled there is room again."""
    port = await backend.open(max_pending_writes=3)
    outcomes = await submit(port, "gw-a", [reg(f"ue-{i}") for i in range(5)] + [dereg("x")]).done
    assert outcomes[:3] == [SUCCESS] * 3
    assert all(o.cause == FailureCause.SERVER_BUSY and o.retry_after for o in outcomes[3:])
    assert await submit(port, "gw-a", [reg("ue-3")]).done == [SUCCESS]
    assert await backend.committed("ue-4") is None
    assert await backend.committed("ue-2") is not None


async def test_a_failed_write_fails_its_successes_and_keeps_the_old_state(
    backend: Backend,
) -> None:
    """§5: a change that could not be made durable is STORAGE_FAILURE, never SUCCESS, and
    the registry keeps what it had; it serves again once storage does."""
    port = await backend.open()
    assert await submit(port, "gw-a", [reg("keep", b"old")]).done == [SUCCESS]
    await backend.refuse_big_profiles(True)
    big = bytes(range(256)) * 32
    outcomes = await submit(port, "gw-a", [
        reg("ue-0", big), dereg("nobody"), reg("ue-1", big), reg("keep", None)]).done
    assert outcomes[0] == outcomes[2] == outcomes[3] == STORAGE
    assert outcomes[1] in (NOT_REGISTERED, STORAGE)  # decided, or failed with its group
    await backend.refuse_big_profiles(False)
    assert await submit(port, "gw-a", [reg("ue-0", big)]).done == [SUCCESS]
    assert await backend.committed("keep") == Registration("keep", "gw-a", b"old")
    assert await backend.committed("ue-1") is None


async def test_a_closed_registry_fails_entries_and_does_not_raise(backend: Backend) -> None:
    """port.Registrar: a registry fault never raises into the server; every entry still gets
    exactly one outcome, none of them SUCCESS."""
    port = await backend.open()
    assert await submit(port, "gw-a", [reg("ue-1")]).done == [SUCCESS]
    assert backend.registry is not None
    await backend.registry.close()
    outcomes = await submit(port, "gw-a", [reg("ue-2"), dereg("ue-1"), dereg("nobody")]).done
    assert len(outcomes) == 3 and SUCCESS not in outcomes
    assert all(o.cause in (FailureCause.STORAGE_FAILURE, FailureCause.SERVER_BUSY,
                           FailureCause.NOT_REGISTERED) for o in outcomes)
