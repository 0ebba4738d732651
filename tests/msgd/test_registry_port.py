"""The registry port (msgd.registry.port) over the embedded registry (registry.local).

A real Registry on a real SQLite file in tmp_path; outcomes are awaited through the port's
own callback, never through sleeps. Each test states the wire-v1 §5 rule it holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from msgd.errors import RegistryError
from msgd.registry.local import LocalRegistrar
from msgd.registry.port import SUCCESS, Change, Outcome, Registrar
from msgd.registry.store import Registration, Registry
from wire.constants import FailureCause

NOT_REGISTERED = Outcome(FailureCause.NOT_REGISTERED)
VIA_OTHER = Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)
AUTH_FAILED = Outcome(FailureCause.AUTHENTICATION_FAILED)
STORAGE = Outcome(FailureCause.STORAGE_FAILURE)
BUSY = Outcome(FailureCause.SERVER_BUSY, 500)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite"


@pytest.fixture
async def registry(path: Path):
    reg = Registry.open(path)
    reg.start(asyncio.get_running_loop())
    yield reg
    await reg.close()


class Batch:
    """One submission: the outcomes, and the registry's durable seq when they arrived."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.done: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self.durable_at_decision = -1

    def __call__(self, outcomes: Sequence[Outcome]) -> None:
        assert not self.done.done(), "decided twice"
        self.durable_at_decision = self.registry.durable_seq
        self.done.set_result(list(outcomes))


def submit(port: Registrar, registry: Registry, gateway: str, changes: list[Change]) -> Batch:
    batch = Batch(registry)
    port.submit(gateway, changes, batch)
    return batch


def reg(ue: str, profile: bytes | None = None) -> Change:
    return Change(ue, True, profile)


def dereg(ue: str, verdict: FailureCause | None = None) -> Change:
    return Change(ue, False, None, verdict)


async def test_rules_in_order_and_success_only_when_durable(
    path: Path, registry: Registry
) -> None:
    port = LocalRegistrar(registry, max_pending_writes=1000)
    batch = submit(port, registry, "gw-a", [
        reg("ue-1", b"\x01"),
        dereg("ue-2"),                                  # never registered
        reg("ue-2"),
        dereg("ue-2", FailureCause.AUTHENTICATION_FAILED),  # registered, credential failed
        dereg("ue-1"),
        dereg("ue-1"),                                  # the entry before removed it
        reg("ue-1", b"\x02"),                           # a UE twice: processed twice
    ])
    last = registry.last_seq
    outcomes = await batch.done
    assert outcomes == [SUCCESS, NOT_REGISTERED, SUCCESS, AUTH_FAILED, SUCCESS,
                        NOT_REGISTERED, SUCCESS]
    assert batch.durable_at_decision >= last  # every success was durable when told
    assert registry.registration("ue-1") == Registration("ue-1", "gw-a", b"\x02")
    assert registry.registration("ue-2") == Registration("ue-2", "gw-a", None)
    await registry.close()
    reopened = Registry.open(path)
    try:
        assert reopened.registration("ue-1") == Registration("ue-1", "gw-a", b"\x02")
        assert reopened.registered_count() == 2
    finally:
        reopened.close_sync()


async def test_other_gateway_and_takeover(registry: Registry) -> None:
    port = LocalRegistrar(registry, max_pending_writes=1000)
    first = submit(port, registry, "gw-a", [reg("ue-1")])
    first_seq = registry.last_seq
    # Decided on gw-a's change before it is durable: the failure must not overtake it.
    # wire-v1 §5: the registration is checked before the credential.
    second = submit(port, registry, "gw-b", [
        dereg("ue-1"), dereg("ue-1", FailureCause.AUTHENTICATION_FAILED), reg("ue-1"),
        dereg("ue-1")])
    assert await second.done == [VIA_OTHER, VIA_OTHER, SUCCESS, SUCCESS]
    assert first.done.done()  # handed over in submission order
    assert await first.done == [SUCCESS]
    assert second.durable_at_decision >= registry.last_seq > first_seq
    assert registry.registration("ue-1") is None


async def test_failure_waits_for_the_state_it_was_decided_on(registry: Registry) -> None:
    port = LocalRegistrar(registry, max_pending_writes=1000)
    submit(port, registry, "gw-a", [reg(f"ue-{i}") for i in range(50)])
    seen = registry.last_seq
    # A batch with no change of its own, decided on 50 changes not yet durable.
    late = submit(port, registry, "gw-b", [dereg("ue-7")])
    assert not late.done.done()
    assert await late.done == [VIA_OTHER]
    assert late.durable_at_decision >= seen


async def test_nothing_to_wait_for_is_decided_at_once(registry: Registry) -> None:
    port = LocalRegistrar(registry, max_pending_writes=1000)
    batch = submit(port, registry, "gw-a", [dereg("ue-1"), dereg("ue-2")])
    assert batch.done.done()  # before submit returned: no change, none pending
    assert batch.done.result() == [NOT_REGISTERED, NOT_REGISTERED]


async def test_settle_completed_decides_a_finished_batch_before_the_loop_turns(
    registry: Registry,
) -> None:
    # The server calls it after each read, so that an answer made durable does not wait for
    # the reads of every other connection of the loop's turn.
    port = LocalRegistrar(registry, max_pending_writes=1000)
    calls: list[list[Outcome]] = []
    port.submit("gw-a", [reg("ue-1")], lambda outcomes: calls.append(list(outcomes)))
    registry._writer.wait_completions()  # this thread (the loop's) waits for the commit
    assert calls == []  # the loop has not turned: the drain the writer scheduled waits
    port.settle_completed()
    assert calls == [[SUCCESS]]
    assert registry.durable_seq == registry.last_seq
    # The writer scheduled that drain before it took the next batch, so once the next one is
    # decided through the loop, the first drain has run too, and found nothing: decided once.
    later = submit(port, registry, "gw-a", [reg("ue-2")])
    assert await later.done == [SUCCESS]
    assert calls == [[SUCCESS]]


async def test_busy_beyond_the_pending_writes_limit(registry: Registry) -> None:
    port = LocalRegistrar(registry, max_pending_writes=3)
    batch = submit(port, registry, "gw-a", [reg(f"ue-{i}") for i in range(5)] + [dereg("x")])
    assert await batch.done == [SUCCESS] * 3 + [BUSY] * 3  # busy comes before NOT_REGISTERED
    assert sorted(r.ue_service_id for r in registry.iter_registrations()) == [
        "ue-0", "ue-1", "ue-2"]
    # Once settled, there is room again.
    assert await submit(port, registry, "gw-a", [reg("ue-3")]).done == [SUCCESS]


async def test_failed_commit_turns_covered_successes_into_storage_failure(
    registry: Registry,
) -> None:
    port = LocalRegistrar(registry, max_pending_writes=10_000)
    assert await submit(port, registry, "gw-a", [reg("keep", b"old")]).done == [SUCCESS]
    registry._debug_set_max_page_count(None)  # no page beyond the current size: disk full
    big = bytes(range(256)) * 32
    batch = submit(port, registry, "gw-a", [
        reg("ue-0", big), dereg("nobody"), reg("ue-1", big), reg("keep", None)])
    assert await batch.done == [STORAGE, NOT_REGISTERED, STORAGE, STORAGE]
    assert registry.registration("keep") == Registration("keep", "gw-a", b"old")
    assert registry.registration("ue-0") is None
    registry._debug_set_max_page_count(1 << 30)
    assert await submit(port, registry, "gw-a", [reg("ue-0", big)]).done == [SUCCESS]


async def test_a_refusing_registry_fails_entries_and_does_not_raise(path: Path) -> None:
    registry = Registry.open(path)
    registry.start(asyncio.get_running_loop())
    port = LocalRegistrar(registry, max_pending_writes=1000)
    assert await submit(port, registry, "gw-a", [reg("ue-1")]).done == [SUCCESS]
    await registry.close()  # from now on every change is refused
    batch = submit(port, registry, "gw-a", [reg("ue-2"), dereg("ue-1"), dereg("nobody")])
    assert batch.done.done()
    assert batch.done.result() == [STORAGE, STORAGE, NOT_REGISTERED]


async def test_refusals_are_logged_once_per_ten_thousand(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry.open(path)
    registry.start(asyncio.get_running_loop())
    port = LocalRegistrar(registry, max_pending_writes=100_000)
    await registry.close()
    caplog.set_level("ERROR", logger="msgd.registry")
    # A line for the batch that holds refusal 1, 10,001, 20,001, ..., with the count so far.
    for size in (1, 9_999, 1, 10_005, 9_994, 1):
        submit(port, registry, "gw-a", [reg(f"ue-{i}") for i in range(size)])
    lines = [r for r in caplog.records if r.getMessage() == "registry.refused"]
    assert [r.msgd_fields["refusals"] for r in lines] == [1, 10_001, 20_006, 30_001]
    with pytest.raises(RegistryError) as refused:  # the reason a caller of the registry gets
        registry.submit_register("ue-x", "gw-a", None)
    assert {r.msgd_fields["reason"] for r in lines} == {str(refused.value)}
