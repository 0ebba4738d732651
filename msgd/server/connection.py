"""asyncio glue for one gateway connection: bytes ↔ wire Session ↔ rules and registry port.

Kept thin on purpose (aioquic's asyncio/protocol.py): protocol rules live in wire.session,
per-UE rules in msgd.server.rules and behind the registry port (msgd.registry.port). What
lives here is batching and flow control:

* the entries and requests decoded in one turn go to the registry port as one batch; their
  answers wait in an AnswerQueue (server.answers), in request order, until the port says
  they are final (wire-v1 §5: "A success result is sent only after the change is durable");
* more than `bulk_window` unanswered entries, or a peer that does not read what we write
  (asyncio's pause_writing), stop reading from the socket, so TCP holds the gateway back and
  neither a huge bulk nor a gateway that never reads can grow our memory.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterable
from itertools import repeat
from typing import TYPE_CHECKING, Any

from msgd.log import get_logger
from msgd.procedures import Procedure
from msgd.registry.port import Change, Outcome
from msgd.server.answers import DECIDED, AnswerQueue
from msgd.server.frame_clock import FrameClock
from msgd.server.ports import Refusal
from msgd.server.sync import answer_sync
from msgd.tls.contexts import negotiated_alpn_ok, peer_identity
from msgd.tls.reads import TlsReads
from wire.constants import ErrorCause, FailureCause, MessageType
from wire.credential import ProofChecker
from wire.errors import EntryError
from wire.events import (
    NEED_DATA,
    PAUSED,
    BulkEnded,
    BulkEntriesReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    GoodbyeReceived,
    HelloReceived,
    ProtocolErrorDetected,
    RequestReceived,
    SyncRequestReceived,
    TransactionFailed,
)
from wire.messages import profile_octets
from wire.session import Role, Session

if TYPE_CHECKING:
    from msgd.config import GatewayPolicy
    from msgd.server.ports import ConnectionHost
    from msgd.tls.contexts import ServerTls

_log = get_logger("msgd.connection")
# Errors logged per connection before the rest are only counted (a flood of bad frames
# must not become a flood of log lines).
LOGGED_ERRORS = 20
# Events one connection handles per turn of the event loop; a peer that sends faster than we
# decode waits for the others (fairness), with reading paused so its backlog cannot grow.
EVENTS_PER_TURN = 256
# Octets of one connection handed to its session per turn. Frames that make no event
# (KEEPALIVE and KEEPALIVE ACK are answered inside the session) escape EVENTS_PER_TURN:
# without this bound one read (uvloop: up to 256 KiB, some 22,000 KEEPALIVEs) is handled in
# one callback, and libuv's read loop hands over the next one before any other peer is read.
OCTETS_PER_TURN = 16 * 1024

SINGLE_REG, SINGLE_DEREG, BULK_REG, BULK_DEREG = Procedure
SERVER_BUSY = FailureCause.SERVER_BUSY
# A NamedTuple made from a tuple without its generated __new__ (a Python-level call).
_new_tuple = tuple.__new__
_KIND_OF = {
    MessageType.UE_REGISTRATION_REQUEST: SINGLE_REG,
    MessageType.UE_DEREGISTRATION_REQUEST: SINGLE_DEREG,
}
class GatewayConnection(TlsReads):
    """One gateway: TLS set up by the server, then a wire Session in the SERVER role.

    Over 400 lines on purpose: an asyncio.Protocol's callbacks (bytes in, EOF, lost,
    pause/resume writing), its three timers (keepalive, frame, abort after close) and the close
    sequence all read and change the same transport state; split further, each part would need
    the others. What stands apart already does: the answers (server.answers), the frame clock
    (server.frame_clock), the rules (server.rules) and the session (wire.session).
    """

    def __init__(
        self, server: ConnectionHost, accepted_at: float | None = None,
        tls: ServerTls | None = None,
    ) -> None:
        self.server = server
        # The TLS state this connection's handshake used (a reload may replace the server's).
        self.tls = tls
        self.loop = server.loop
        # The HELLO deadline counts from TCP accept, not from the end of the TLS handshake:
        # TLS and HELLO together get hello_timeout (docs/protocol.md, Decisions).
        self.accepted_at = accepted_at
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.identity: str | None = None
        self.policy: GatewayPolicy | None = None
        self.peer = "?"
        self.nonce = b""
        self.proofs: ProofChecker | None = None  # the UE credential check, once HELLO is done
        self.connected_at = 0.0
        self.entries_processed = 0
        self.log = _log
        self._answers = AnswerQueue()
        self._bulk_kinds: dict[int, tuple[int, object]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._reading_paused = False
        self._writing_paused = False
        self.writable = asyncio.Event()  # clear while the transport asks us to stop writing
        self.writable.set()
        self._sync_tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._frame_clock = FrameClock()
        self._frame_timer: asyncio.TimerHandle | None = None
        self._errors = 0  # protocol errors, failed transactions and peer ERRORs seen
        # Events left in the session's buffer after a turn's budget; reading stops meanwhile.
        self._backlog = False
        self._continuing = False
        # Octets read but not yet handed to the session (OCTETS_PER_TURN), and an EOF behind them.
        self._unfed = bytearray()
        self._unfed_eof = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._window_full = False

    # --- set-up -----------------------------------------------------------------------------

    def start(self, transport: asyncio.Transport) -> None:
        """Set up the session for a connection whose TLS handshake has completed."""
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.log = _log.bind(peer=self.peer)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is None or not negotiated_alpn_ok(ssl_object):
            # wire-v1 §1: "The server MUST refuse a connection that does not negotiate it."
            self.log.warning("connection.refused", reason="no ALPN msgin5g-gw/1")
            self.server.metrics.connection_refused("alpn")
            transport.abort()
            return
        self.identity = peer_identity(ssl_object)
        self.log = self.log.bind(gateway=self.identity)
        if self.server.revoked_since_handshake(self, self.peer_der()):
            # The CRL changed while this handshake ran: revocation takes effect at once.
            self.log.warning("connection.refused", reason="certificate revoked by a reload")
            self.server.metrics.connection_refused("tls")
            transport.abort()
            return
        limits = self.server.settings.limits
        now = self.loop.time()
        self.connected_at = now
        started = now if self.accepted_at is None else min(self.accepted_at, now)
        self.session = Session(Role.SERVER, started, limits, batch_entries=True)
        transport.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)
        self.server.connection_started(self)
        self.log.info("connection.open")
        self._arm_timer()

    @property
    def owed(self) -> int:
        """Answers decided or in the registry, not yet sent (the overload policy's backlog)."""
        return self._answers.unanswered + len(self._answers.answers)

    @property
    def closing(self) -> bool:
        """We said GOODBYE: the connection ends once its transactions are done."""
        return self.session is not None and self.session.goodbye_sent

    def peer_der(self) -> bytes | None:
        """The certificate the gateway connected with (DER), None without one."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the TLS handshake has completed (connect_accepted_socket with ssl=).
        self.start(transport)  # type: ignore[arg-type]

    # --- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None or self._closed:
            return
        now = self.loop.time()
        server = self.server
        server.metrics.received(len(data))
        frames, restarted = self._frame_clock.follow(data, now)
        if frames:
            server.metrics.frames(frames)
        if restarted:
            self._arm_frame_timer()
        if self._unfed or len(data) > OCTETS_PER_TURN:
            self._unfed += data
        else:
            request = None if self._backlog else session.take_single_request(data, now)
            if request is not None:
                self._take_lone(request)
                server.registrar.settle_completed()
                return
            session.receive_data(data, now)
        self._process()
        # Answers the registry made durable meanwhile (this connection's or another's) go out
        # now, not after the reads of every other connection ready in this loop turn.
        server.registrar.settle_completed()

    def eof_received(self) -> bool:
        if self.session is not None and not self._closed:
            if self._unfed:
                self._unfed_eof = True
            else:
                self.session.receive_data(b"", self.loop.time())
            self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers(abort_timer=True)
        was_open = not self._closed
        self._closed = True
        self._answers.drop()
        self._unfed.clear()
        for task in self._sync_tasks:  # a LIST RESPONSE waiting for a transport now gone
            task.cancel()
        self.server.connection_ended(self)
        if was_open and self.session is not None:
            self.log.info("connection.closed", reason=str(exc) if exc else "peer closed",
                          errors=self._errors)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.writable.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.writable.set()
        self._update_reading()

    # --- events -----------------------------------------------------------------------------

    def _process(self) -> None:
        try:
            self._process_events()
        except Exception as exc:  # a bug must cost this connection only, never the loop
            self.fail(exc)

    def _process_events(self) -> None:
        """Long on purpose: the event dispatch of the hot path, one branch per event type; a call
        per branch would cost per bulk entry."""
        session = self.session
        assert session is not None
        server = self.server
        budget = EVENTS_PER_TURN
        octets = OCTETS_PER_TURN
        # This turn's single requests not decided yet, of one kind: decided together.
        singles: list[tuple[Any, ...]] = []
        while True:
            if not budget:
                # Fairness: one peer's buffered flood must not hold the loop; the rest of it
                # is handled on the next turn, after the other connections had theirs.
                self._backlog = True
                break
            budget -= 1
            event = session.next_event()
            if event is NEED_DATA and self._unfed:
                if octets <= 0:
                    self._backlog = True  # the rest of this read on a later turn
                    break
                octets -= self._feed()
                continue
            if event is NEED_DATA or event is PAUSED:
                self._backlog = False
                break
            kind = type(event)
            if kind is BulkEntriesReceived:
                budget -= len(event.entries) - 1  # fairness counts entries, not events
                self._decide_singles(singles)  # answered in the order they came
                self._on_bulk_entries(event)
            elif kind is RequestReceived:
                self._on_request(event.request, singles)
            elif kind is BulkStarted:
                bulk_kind = (
                    BULK_REG
                    if event.message_type is MessageType.BULK_REGISTRATION_REQUEST
                    else BULK_DEREG
                )
                tid = event.transaction_id
                server.metrics.bulk_started(bulk_kind)
                server.metrics.message(event.message_type.name)
                retry = server.refuse_request("bulk", len(self._answers.changes))
                if retry is not None:  # overloaded: the whole request (docs/protocol.md §7)
                    session.send_error(tid, ErrorCause.OVERLOADED, "server overloaded", retry)
                    continue
                self._bulk_kinds[tid] = (bulk_kind, session.transaction(tid))
            elif kind is SyncRequestReceived:
                server.metrics.message(type(event.request).message_type.name)
                self._on_sync_request(event.request)
            elif kind is BulkEnded:
                self._bulk_kinds.pop(event.transaction_id, None)
            elif kind is HelloReceived:
                server.metrics.message("HELLO")
                self._on_hello(event)
            elif kind is ProtocolErrorDetected:
                server.metrics.protocol_error(event.error.cause)
                if self._noisy():
                    self.log.warning(
                        "protocol.error",
                        cause=event.error.cause.name,
                        tid=event.error.transaction_id,
                        detail=event.error.diagnostic,
                    )
            elif kind is TransactionFailed:
                self._bulk_kinds.pop(event.transaction_id, None)
                server.metrics.transaction_failed(event.cause)
                if self._noisy():
                    self.log.info(
                        "transaction.failed",
                        tid=event.transaction_id,
                        cause=getattr(event.cause, "name", event.cause),
                        sent=event.sent,
                    )
            elif kind is GoodbyeReceived:
                server.metrics.message("GOODBYE")
                self.log.info("gateway.goodbye", cause=event.goodbye.error_cause)
            elif kind is ErrorReceived:
                server.metrics.message("ERROR")
                server.metrics.peer_error(event.error.error_cause)
                if self._noisy():
                    self.log.info(
                        "gateway.error",
                        cause=event.error.error_cause,
                        tid=event.error.transaction_id,
                    )
            elif kind is ConnectionClosed:
                self.log.info("session.closed", reason=event.reason, by_peer=event.by_peer)
        self._finish_turn(singles)
        # After a GOODBYE either way, the connection ends once nothing is in progress: the
        # gateway's own close would otherwise wait on our TLS close_notify.
        if session.is_closed or (
            (session.goodbye_sent or session.goodbye_received) and session.can_close
            and not self._answers and not self._unfed
        ):
            self._close()
        else:
            self._arm_timer()
            if self._backlog and not self._continuing:
                self._continuing = True
                self.loop.call_soon(self._continue)

    def _take_lone(self, request: Any) -> None:
        """A read that was one whole single request (Session.take_single_request): handled
        as _process_events handles a RequestReceived and what follows it, without going
        round its event loop (docs/performance.md, "2026-12-07 (afternoon)"). The keepalive
        timer is left as it is: a request only moves the session's deadline later, and the
        armed timer re-arms itself when it fires early (_on_timer)."""
        try:
            singles: list[tuple[Any, ...]] = []
            self._on_request(request, singles)
            self._finish_turn(singles)
        except Exception as exc:  # as _process: a bug costs this connection only
            self.fail(exc)

    def _finish_turn(self, singles: list[tuple[Any, ...]]) -> None:
        """What ends a turn of reads: this turn's singles decided, its batch submitted, and
        the answers now in order written."""
        self._decide_singles(singles)
        self._submit()
        self._flush()

    def _feed(self) -> int:
        """Hand the session the next OCTETS_PER_TURN octets read; returns how many."""
        session = self.session
        assert session is not None
        unfed = self._unfed
        chunk = bytes(unfed[:OCTETS_PER_TURN])
        del unfed[:OCTETS_PER_TURN]
        now = self.loop.time()
        session.receive_data(chunk, now)
        if not unfed and self._unfed_eof:
            session.receive_data(b"", now)
        return len(chunk)

    def _continue(self) -> None:
        self._continuing = False
        if not self._closed and self.session is not None:
            self._process()

    def _noisy(self) -> bool:
        """Whether to log one more error of this connection: the first LOGGED_ERRORS are,
        then one line says the rest are only counted (metrics, and `errors=` when the
        connection closes). A peer must not turn each bad frame into a log line."""
        self._errors += 1
        if self._errors == LOGGED_ERRORS + 1:
            self.log.warning("connection.errors_muted", logged=LOGGED_ERRORS)
        return self._errors <= LOGGED_ERRORS

    def _on_hello(self, event: HelloReceived) -> None:
        session = self.session
        assert session is not None
        policy = self.server.admit(self.identity)
        if isinstance(policy, Refusal):
            self.server.metrics.connection_refused(policy.reason)
            if policy.retry_after is None:
                self.log.warning("gateway.refused", reason=policy.log_detail)
                session.reject_hello(policy.cause, policy.diagnostic)
            else:
                if policy.reason != "overloaded":
                    # (overload: one line per episode, from the server, not one per session)
                    self.log.warning("gateway.reconnect_damped",
                                     retry_after_ms=policy.retry_after)
                session.send_goodbye(policy.cause, policy.retry_after, policy.diagnostic)
            return
        self.policy = policy
        self.nonce = os.urandom(32)
        self.proofs = ProofChecker(self.nonce)
        session.accept_hello(
            server_nonce=self.nonce,
            bulk_allowed=policy.bulk_allowed,
            ue_authentication_required=policy.ue_authentication,
            node_name=self.server.settings.node_name,
            sync_supported=hasattr(self.server.reads, "sync_digests"),
        )
        self.log.info(
            "gateway.hello", gateway_type=event.hello.gateway_type, node=event.hello.node_name
        )

    def _on_request(self, request: Any, singles: list[tuple[Any, ...]]) -> None:
        """A single request joins `singles`, this turn's run of undecided ones of its kind
        (decided together by `_decide_singles`); answers keep the order requests came in."""
        session = self.session
        assert session is not None
        self.server.metrics.message(type(request).message_type.name)
        tid = request.transaction_id
        handle = session.transaction(tid)
        if handle is None:  # pragma: no cover - the session delivers live requests only
            return
        kind = _KIND_OF[type(request).message_type]
        retry = self.server.refuse_request("single", len(self._answers.changes) + len(singles))
        if retry is not None:  # overloaded: SERVER_BUSY, Retry after (docs/protocol.md §7)
            self._decide_singles(singles)
            self._answers.answers.append(
                (tid, handle, kind, request.ue_service_id, Outcome(SERVER_BUSY, retry)))
            return
        if singles and singles[0][1] is not kind:
            self._decide_singles(singles)
        singles.append(((tid, handle), kind, request))

    def _decide_singles(self, singles: list[tuple[Any, ...]]) -> None:
        if singles:
            self._decide(singles[0][1], [single[0] for single in singles],
                         [single[2] for single in singles])
            singles.clear()

    def _on_sync_request(self, request: Any) -> None:
        """v1.1 DIGEST / LIST REQUEST: answered by msgd.server.sync in a task of its own."""
        session = self.session
        assert session is not None
        task = self.server.loop.create_task(
            answer_sync(self, request, session.transaction(request.transaction_id)))
        self._sync_tasks.add(task)
        task.add_done_callback(self._sync_tasks.discard)

    def _on_bulk_entries(self, event: BulkEntriesReceived) -> None:
        tid = event.transaction_id
        known = self._bulk_kinds.get(tid)
        if known is None:  # pragma: no cover - refused at its start: the session discards
            return
        kind, handle = known
        self._decide(kind, repeat((tid, handle)), event.entries)

    def _decide(self, kind: Procedure, addresses: Iterable[tuple[int, object]],
                entries: Any) -> None:
        """The rules that need only provisioning decide a run of requests or bulk entries (each
        with ue_service_id, credential and, registering, profile) now; the rest joins this
        turn's batch for the registry port (`_submit`). The rules decide the run in one call
        (msgd.server.rules), then one loop turns their causes into answers and changes.
        `addresses` gives each entry's (transaction id, handle): one bulk's for all its
        entries, or each single request's own."""
        policy = self.policy
        proofs = self.proofs
        assert policy is not None and proofs is not None
        self.entries_processed += len(entries)
        answer = self._answers.answers.append
        change = self._answers.changes.append
        registering = kind is BULK_REG or kind is SINGLE_REG
        rules = self.server.rules
        if registering:
            causes = iter(rules.registrations(
                policy, proofs, [e for e in entries if e.__class__ is not EntryError]))
        else:
            causes = iter(rules.deregistrations(
                policy, proofs,
                [e for e in entries if e.__class__ is not EntryError and not e.release]))
        verdict = causes.__next__
        for (tid, handle), entry in zip(addresses, entries, strict=False):  # repeat() is endless
            if entry.__class__ is EntryError:
                answer((tid, handle, kind, entry.ue_service_id or "", FailureCause.INVALID_ENTRY))
                continue
            uid = entry.ue_service_id
            if not registering and entry.release:
                # v1.1 Release (docs/protocol.md §6.4): no credential; the port still refuses
                # a UE not registered (NOT_REGISTERED) or registered through another gateway.
                self.log.info("ue.release", gateway=policy.identity, ue=uid)
                change(_new_tuple(Change, (uid, False, None, None)))
                answer((tid, handle, kind, uid, DECIDED))
                continue
            cause = verdict()
            if registering:
                if cause is not None:
                    answer((tid, handle, kind, uid, cause))
                    continue
                profile = entry.profile
                change(_new_tuple(Change, (
                    uid, True, profile_octets(profile) if profile is not None else None, None)))
            else:
                change(_new_tuple(Change, (uid, False, None, cause)))
            answer((tid, handle, kind, uid, DECIDED))

    def _submit(self) -> None:
        """Hand this turn's decisions to the registry port as one batch."""
        policy = self.policy
        if policy is not None:
            self._answers.submit(self.server.registrar, policy.identity, self._on_decided)

    # --- answers ----------------------------------------------------------------------------

    def _on_decided(self) -> None:
        """The port finished a batch after this turn: send what is now in order to send.

        Never raises: the port calls this for every waiting connection in one loop, and one
        connection's failure must not delay the answers of the others (it closes that one)."""
        try:
            session = self.session
            if self._closed or session is None:
                return
            self._flush()
            if (
                (session.goodbye_sent or session.goodbye_received)
                and session.can_close
                and not self._answers
            ):
                self._close()
        except Exception as exc:
            self.fail(exc)

    def _flush(self) -> None:
        """Encode the answers now in order to send, write them, and read again or not."""
        session = self.session
        assert session is not None
        self._answers.send_ready(session, self.server.metrics.answers)
        self._write()
        self._update_reading()

    def _write(self) -> None:
        session = self.session
        transport = self.transport
        if session is None or transport is None:
            return
        data = session.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
            self.server.metrics.sent(len(data))

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        # A full window pauses until half of it is answered (hysteresis); a backlog or a
        # peer that does not read pauses only while it lasts.
        pending, window = self._answers.unanswered, self.server.settings.bulk_window
        if pending >= window:
            self._window_full = True
        elif pending <= window // 2:
            self._window_full = False
        stop = self._writing_paused or self._backlog or self._window_full
        if stop and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not stop and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
            now = self.loop.time()
            if self._frame_clock.restart(now):
                self._arm_frame_timer()
            if self.session is not None:
                # What the peer sent while we did not read was not its silence (keepalive).
                self.session.reading_resumed(now)
                self._arm_timer()

    # --- frame clock (slow drip) ------------------------------------------------------------

    def _arm_frame_timer(self) -> None:
        since = self._frame_clock.since
        if self._frame_timer is None and since is not None and not self._closed:
            when = since + self.server.settings.frame_timeout
            self._frame_timer = self.loop.call_at(when, self._on_frame_timer)

    def _on_frame_timer(self) -> None:
        self._frame_timer = None
        since = self._frame_clock.since
        session = self.session
        if since is None or session is None or self._closed or self._reading_paused:
            return  # complete, closed, or paused by us (resuming restarts the clock)
        timeout = self.server.settings.frame_timeout
        if self.loop.time() < since + timeout:
            self._arm_frame_timer()  # a later frame began meanwhile
            return
        self.log.warning("connection.slow_frame", frame_timeout=timeout)
        self.server.metrics.protocol_error(ErrorCause.IDLE_TIMEOUT)
        session.send_error(
            0, ErrorCause.IDLE_TIMEOUT, f"frame not complete {timeout:g} s after its first octet"
        )
        self._process()

    # --- timers and closing -----------------------------------------------------------------

    def _arm_timer(self) -> None:
        session = self.session
        if session is None or self._closed:
            return
        when = session.get_timer()
        if when is None:
            return
        # Deadlines only move later as data arrives; a timer already due earlier re-arms itself.
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        session = self.session
        if session is None or self._closed:
            return
        now = self.loop.time()
        if self._reading_paused and not self._writing_paused:
            # We stopped reading (answers window full, or a backlog), not the peer: what it sent
            # since, its KEEPALIVE ACK included, waits unread, so its silence is ours. Look again
            # an interval later; reading again restarts the deadlines (_update_reading).
            self._timer_at = now + session.limits.keepalive_interval
            self._timer = self.loop.call_at(self._timer_at, self._on_timer)
            return
        session.handle_timer(now)
        self._process()

    def goodbye(
        self, cause: ErrorCause, diagnostic: str = "", retry_after: int | None = None
    ) -> None:
        """Announce an orderly close (shutdown, drain, gateway removed or revoked)."""
        session = self.session
        if session is None or self._closed:
            if self.transport is not None and session is None:
                self.transport.abort()
            return
        session.send_goodbye(cause, retry_after, diagnostic)
        self.server.metrics.goodbye(cause)
        self._write()
        if session.can_close:
            self._close()

    def revoke(self, diagnostic: str) -> None:
        """The gateway lost its permission (removed from [[gateways]], or its certificate
        revoked): decide nothing more, drop the answers not yet sent, GOODBYE
        (GATEWAY_NOT_ALLOWED) and close (wire-v1 §4 item 6)."""
        session = self.session
        self._answers.drop()
        self._bulk_kinds.clear()
        if session is None or self._closed:
            self.abort()
            return
        session.terminate(ErrorCause.GATEWAY_NOT_ALLOWED, diagnostic)
        self.server.metrics.goodbye(ErrorCause.GATEWAY_NOT_ALLOWED)
        self._write()
        self._close()

    def fail(self, exc: Exception) -> None:
        """An internal error while serving this connection: log it, close this one only."""
        self.log.error("connection.internal_error", reason=type(exc).__name__,
                       detail=str(exc)[:200], exc_info=exc)
        self._answers.drop()
        self._closed = True
        self._cancel_timers()
        self.abort()

    def _cancel_timers(self, *, abort_timer: bool = False) -> None:
        """Cancel the keepalive and frame timers (and the close's abort timer, once gone)."""
        for timer in (self._timer, self._frame_timer,
                      self._abort_timer if abort_timer else None):
            if timer is not None:
                timer.cancel()
        self._timer = self._frame_timer = None
        if abort_timer:
            self._abort_timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _abort_unflushed(self) -> None:
        self._abort_timer = None
        if self.transport is not None:
            self.log.warning("connection.aborted", reason="peer did not read our last octets",
                             after=self.server.settings.frame_timeout)
            self.transport.abort()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        transport = self.transport
        if transport is not None:
            # Give TLS a chance to flush the last frames (ERROR / responses) before FIN.
            transport.close()
            # A peer that never reads would hold that flush, and the connection, for ever: it
            # gets frame_timeout to take our last octets (docs/protocol.md, Decisions).
            self._abort_timer = self.loop.call_later(
                self.server.settings.frame_timeout, self._abort_unflushed)
