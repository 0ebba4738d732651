"""Transactions a gateway ends, ids it reuses, entries it malforms, and failures while
answering: real msgd in this process over real TLS, a real SQLite file, a raw gateway."""

from __future__ import annotations

import asyncio
import logging

from tests.harness import Gw, RawGateway, connect, make_deployment, running_server
from wire.constants import IEI, ErrorCause, FailureCause, MessageType
from wire.credential import compute_proof
from wire.ies import encode_ie, split_ies
from wire.messages import (
    Error,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
    bulk_header_ies,
    decode_body,
    decode_entry,
    encode_entry,
    encode_frame,
    encode_message,
)

BOUND = 10.0


def _dep(tmp_path, pki, uids):
    return make_deployment(tmp_path / "d", pki, ues={uid: ["gw1.example"] for uid in uids},
                           gateways=(Gw("gw1.example"), Gw("gw2.example")))


def _reg(dep, raw: RawGateway, tid: int, uid: str) -> bytes:
    return encode_message(UeRegistrationRequest(
        tid, uid, compute_proof(dep.keys[uid], raw.nonce, 1, uid)))


def _dereg(dep, raw: RawGateway, tid: int, uid: str) -> bytes:
    return encode_message(UeDeregistrationRequest(
        tid, uid, compute_proof(dep.keys[uid], raw.nonce, 2, uid)))


async def _frames_until(raw: RawGateway, tid: int) -> list[tuple[int, int, object]]:
    """Every frame up to and including the first non-ERROR answer for `tid`, decoded as
    (type, tid, message); bulk frames stay raw bodies."""
    out = []
    while True:
        mtype, _flags, got, body = await raw.read_frame(timeout=BOUND)
        message = body if mtype in (MessageType.BULK_REGISTRATION_RESPONSE,
                                    MessageType.BULK_DEREGISTRATION_RESPONSE) \
            else decode_body(MessageType(mtype), got, body)
        out.append((mtype, got, message))
        if got == tid and mtype != MessageType.ERROR:
            return out


async def test_gateway_error_ends_its_transaction_and_frees_the_id(tmp_path, pki):
    """issue 10, item 2, in one write: REGISTRATION tid T, ERROR(INTERNAL_ERROR) tid T,
    DE-REGISTRATION tid T. The registration's answer is never sent; the de-registration
    gets its own answer; a later request on another id is answered after it (so nothing
    else for T is still on its way)."""
    uids = ["a@example", "b@example"]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()
        await raw.send(
            _reg(dep, raw, 5, "a@example")
            + encode_message(Error(5, int(ErrorCause.INTERNAL_ERROR), None, "gateway gave up"))
            + _dereg(dep, raw, 5, "a@example")
            + _reg(dep, raw, 6, "b@example"))
        frames = await _frames_until(raw, 6)
        for_5 = [(mtype, message) for mtype, tid, message in frames if tid == 5]
        assert len(for_5) == 1, frames
        mtype, answer = for_5[0]
        assert mtype == MessageType.UE_DEREGISTRATION_RESPONSE, frames
        assert answer.ue_service_id == "a@example"
        # The registration may or may not have been processed (wire-v1 §5 Count): the
        # de-registration found it (SUCCESS) or not (NOT_REGISTERED); either way it is gone.
        assert answer.failure_cause in (None, FailureCause.NOT_REGISTERED), answer
        assert frames[-1][2].failure_cause is None  # b registered
        assert server.registry.registration("a@example") is None
        assert len(server.connections) == 1  # the connection goes on
        raw.close()


async def test_gateway_error_on_a_bulk_drops_its_answers_and_frees_the_id(tmp_path, pki):
    """A bulk ended by the gateway's ERROR: none of its answers not yet sent goes out, and
    a new bulk on the same id gets exactly its own answers."""
    uids = [f"u{i}@example" for i in range(40)]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()

        def bulk(uid_list, *, more: bool, count: int) -> bytes:
            body = bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, count)
            for uid in uid_list:
                body += encode_entry(RegistrationEntry(
                    uid, compute_proof(dep.keys[uid], raw.nonce, 1, uid)))
            return encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 3, body, more=more)

        await raw.send(
            bulk(uids[:20], more=True, count=30)
            + encode_message(Error(3, int(ErrorCause.INTERNAL_ERROR), None, None))
            + bulk(uids[20:], more=False, count=20)
            + _reg(dep, raw, 4, "u0@example"))
        frames = await _frames_until(raw, 4)
        answered = [
            decode_entry(IEI.REGISTRATION_RESPONSE_ENTRY, value).ue_service_id
            for mtype, tid, body in frames if tid == 3
            for iei, value in split_ies(body) if iei == IEI.REGISTRATION_RESPONSE_ENTRY
        ]
        # Some of the first bulk's answers may have left before its ERROR was read; after
        # them only the second bulk's, all of them, in order.
        tail = answered[-20:]
        assert tail == uids[20:], answered
        assert set(answered[:-20]) <= set(uids[:20])
        assert not any(mtype == MessageType.ERROR for mtype, _tid, _m in frames), frames
        raw.close()


async def test_reused_live_id_is_transaction_id_in_use_whatever_else_is_wrong(tmp_path, pki):
    """While bulk T is still arriving, messages reusing T (unknown type, malformed request,
    wrong direction, a second HELLO) each get ERROR(TRANSACTION_ID_IN_USE) for T, and the bulk
    goes on to its complete answer (wire-v1 §2, §7.2)."""
    uids = ["a@example", "b@example"]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()
        entries = [encode_entry(RegistrationEntry(
            uid, compute_proof(dep.keys[uid], raw.nonce, 1, uid))) for uid in uids]
        first = encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 8,
                             bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, 2)
                             + entries[0], more=True)
        offenders = [
            encode_frame(0x7E, 8, b""),  # unknown message type
            encode_frame(MessageType.UE_REGISTRATION_REQUEST, 8, encode_ie(0x01, b"\x00")),
            encode_frame(MessageType.UE_REGISTRATION_RESPONSE, 8, b""),  # wrong direction
            encode_frame(MessageType.HELLO, 8, b"\xff"),  # second HELLO, malformed too
            encode_frame(MessageType.BULK_DEREGISTRATION_REQUEST, 8, b""),  # other bulk type
        ]
        last = encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 8, entries[1])
        await raw.send(first + b"".join(offenders) + last)
        errors = []
        answered = []
        while len(answered) < 2:
            mtype, flags, tid, body = await raw.read_frame(timeout=BOUND)
            assert tid == 8, (mtype, tid, body)
            if mtype == MessageType.ERROR:
                errors.append(decode_body(MessageType.ERROR, tid, body).error_cause)
                continue
            assert mtype == MessageType.BULK_REGISTRATION_RESPONSE, (mtype, body)
            answered += [decode_entry(IEI.REGISTRATION_RESPONSE_ENTRY, value)
                         for iei, value in split_ies(body)
                         if iei == IEI.REGISTRATION_RESPONSE_ENTRY]
        assert errors == [ErrorCause.TRANSACTION_ID_IN_USE] * len(offenders)
        assert [(e.ue_service_id, e.failure_cause) for e in answered] == \
            [(uid, None) for uid in uids]
        assert not flags & 1  # the response ended: the bulk was never failed
        raw.close()


async def test_invalid_entry_echoes_a_valid_ue_service_id(tmp_path, pki):
    """INVALID_ENTRY carries the entry's UE Service ID when that IE is valid by itself, and
    an empty one when it is missing or invalid (docs/protocol.md)."""
    dep = _dep(tmp_path, pki, ["ok@example"])
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()
        entries = [
            encode_ie(IEI.UE_SERVICE_ID, b"bad-credential@example")
            + encode_ie(IEI.UE_CREDENTIAL, b"\x01" * 5),  # valid ID, credential of 5 octets
            encode_ie(IEI.UE_SERVICE_ID, b"ctrl\x07@example"),  # ID with a control character
            encode_ie(IEI.UE_CREDENTIAL, b"\x01" * 32),  # no ID at all
            encode_ie(0x7F, b"skip") + encode_ie(IEI.UE_SERVICE_ID, b"twice@example")
            + encode_ie(IEI.UE_SERVICE_ID, b"twice@example"),  # ID valid, IE duplicated
        ]
        body = bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, len(entries)) + b"".join(
            encode_ie(IEI.REGISTRATION_ENTRY, entry) for entry in entries)
        await raw.send(encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 4, body))
        answered = []
        while len(answered) < len(entries):
            mtype, _flags, _tid, body = await raw.read_frame(timeout=BOUND)
            assert mtype == MessageType.BULK_REGISTRATION_RESPONSE, (mtype, body)
            answered += [decode_entry(IEI.REGISTRATION_RESPONSE_ENTRY, value)
                         for iei, value in split_ies(body)
                         if iei == IEI.REGISTRATION_RESPONSE_ENTRY]
        assert [(e.ue_service_id, e.failure_cause) for e in answered] == [
            ("bad-credential@example", FailureCause.INVALID_ENTRY),
            ("", FailureCause.INVALID_ENTRY),
            ("", FailureCause.INVALID_ENTRY),
            ("twice@example", FailureCause.INVALID_ENTRY),
        ]
        raw.close()


async def test_registry_refusal_answers_storage_failure_and_keeps_the_connection(
        tmp_path, pki, caplog):
    """The registry's writer stops (an unexpected error in a commit): entries decided after
    that fail with STORAGE_FAILURE, the connection and the daemon stay up."""
    uids = ["a@example", "b@example", "c@example"]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        assert (await gw.register(dep.ue("a@example"))).ok
        registry = server.registry

        def broken_commit() -> None:
            raise RuntimeError("injected: the writer dies")

        registry._writer._commit_batch = broken_commit  # fault injection on the real writer
        first = await gw.register(dep.ue("b@example"))
        assert first.cause == FailureCause.STORAGE_FAILURE
        with caplog.at_level(logging.ERROR, logger="msgd.service"):
            second = await gw.register(dep.ue("c@example"))
        assert second.cause == FailureCause.STORAGE_FAILURE
        assert any(r.getMessage() == "registry.refused" for r in caplog.records)
        third = await gw.deregister(dep.ue("a@example"))
        assert third.cause == FailureCause.STORAGE_FAILURE
        assert gw.is_open and len(server.connections) == 1


async def test_failure_answering_one_connection_closes_it_and_spares_the_others(
        tmp_path, pki, caplog):
    """An exception while answering gw1 (injected into its session) closes gw1 with a log
    line; gw2, waiting on the same registry commits, gets its answers."""
    dep = make_deployment(tmp_path / "d", pki,
                          ues={"a@example": ["gw1.example"], "b@example": ["gw2.example"]})
    async with running_server(dep) as server:
        raw1 = await RawGateway.open(dep, server.address, "gw1.example")
        await raw1.hello()
        async with await connect(dep, server.address, "gw2.example") as gw2:
            (conn1,) = [c for c in server.connections if c.identity == "gw1.example"]

            def broken(*_args: object, **_kwargs: object) -> bool:
                raise RuntimeError("injected: answering failed")

            conn1.session.send_result = broken  # fault injection on one live session
            with caplog.at_level(logging.ERROR, logger="msgd.connection"):
                await raw1.send(_reg(dep, raw1, 5, "a@example"))
                result = await asyncio.wait_for(gw2.register(dep.ue("b@example")), BOUND)
                assert result.ok
                await raw1.expect_eof(timeout=BOUND)
            assert any(r.getMessage() == "connection.internal_error" for r in caplog.records)
            assert (await gw2.register(dep.ue("b@example"))).ok
        raw1.close()


async def test_singles_of_one_read_are_decided_together_and_answered_in_order(tmp_path, pki):
    """Issue 12: the single requests decoded from one read go to the rules as runs of one kind
    (a registration, then a de-registration of the same UE, must stay in that order), a bulk's
    entries between them keep their place, and the answers leave in request order."""
    uids = [f"u{i}@example" for i in range(6)]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server:
        runs: list[tuple[str, list[str]]] = []
        rules = server.rules

        def recorded(name: str):
            decide = getattr(rules, name)

            def recording(gateway, proofs, requests):
                runs.append((name[:-1], [request.ue_service_id for request in requests]))
                return decide(gateway, proofs, requests)
            return recording

        for name in ("registrations", "deregistrations"):
            setattr(rules, name, recorded(name))
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()
        body = bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, 2)
        for uid in uids[3:5]:
            body += encode_entry(RegistrationEntry(
                uid, compute_proof(dep.keys[uid], raw.nonce, 1, uid)))
        # One write, one TLS record: the server reads it in one piece.
        await raw.send(
            _reg(dep, raw, 2, uids[0]) + _reg(dep, raw, 3, uids[1])
            + _dereg(dep, raw, 4, uids[0]) + _reg(dep, raw, 5, uids[2])
            + encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 6, body, more=False)
            + _reg(dep, raw, 7, uids[5]) + _dereg(dep, raw, 8, uids[1]))
        frames = await _frames_until(raw, 8)
        assert [tid for _mtype, tid, _message in frames] == [2, 3, 4, 5, 6, 7, 8]
        singles = [message for mtype, _tid, message in frames
                   if mtype != MessageType.BULK_REGISTRATION_RESPONSE]
        assert [message.result for message in singles] == [0] * 6, singles
        assert runs == [
            ("registration", uids[0:2]), ("deregistration", uids[0:1]),
            ("registration", uids[2:3]), ("registration", uids[3:5]),
            ("registration", uids[5:6]), ("deregistration", uids[1:2]),
        ]
        assert sorted(r.ue_service_id for r in server.registry.iter_registrations()) == [
            uids[2], uids[3], uids[4], uids[5]]
        raw.close()


async def test_a_single_refused_as_busy_keeps_its_place_among_undecided_ones(tmp_path, pki):
    """Overload refuses the second of three singles read together: the first, decided later
    in the turn, is still answered first, and undecided singles count as work not yet
    handed to the registry when the policy is asked."""
    uids = [f"u{i}@example" for i in range(3)]
    dep = _dep(tmp_path, pki, uids)
    async with running_server(dep) as server:
        asked: list[int] = []
        admit = server.refuse_request

        def refuse_the_second(what: str, unsubmitted: int = 0) -> int | None:
            asked.append(unsubmitted)
            return 250 if len(asked) == 2 else admit(what, unsubmitted)

        server.refuse_request = refuse_the_second
        raw = await RawGateway.open(dep, server.address)
        await raw.hello()
        await raw.send(b"".join(_reg(dep, raw, 2 + n, uid) for n, uid in enumerate(uids)))
        frames = await _frames_until(raw, 4)
        answers = [(tid, message.failure_cause, message.retry_after)
                   for _mtype, tid, message in frames]
        assert answers == [(2, None, None), (3, FailureCause.SERVER_BUSY, 250),
                           (4, None, None)]
        assert asked == [0, 1, 1]
        raw.close()
