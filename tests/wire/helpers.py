"""Shared pieces of the wire tests: draining sessions, an in-memory pair, raw frame builders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wire.bulk import BULK_SPECS, bulk_header_ies
from wire.constants import BULK_MESSAGES, IEI, MessageType
from wire.events import (
    NEED_DATA,
    PAUSED,
    Event,
    HelloReceived,
)
from wire.frames import encode_frame

# Shared with the fuzz targets; re-exported for the tests.
from wire.fuzz import NONCE as NONCE
from wire.fuzz import answer as answer
from wire.fuzz import normalize as normalize
from wire.ies import encode_ie, split_ies
from wire.messages import Hello, decode_body
from wire.session import Limits, Role, Session


def drain(session: Session) -> list[Event]:
    """Every event available now (up to NEED_DATA or PAUSED)."""
    out = []
    while True:
        event = session.next_event()
        if event is NEED_DATA or event is PAUSED:
            return out
        out.append(event)


@dataclass
class Frame:
    message_type: int
    flags: int
    transaction_id: int
    body: bytes

    @property
    def more(self) -> bool:
        return bool(self.flags & 1)

    def decode(self) -> Any:
        """The message (non-bulk) or the (IEI, value) pairs of a bulk fragment."""
        if self.message_type in BULK_MESSAGES:
            return split_ies(self.body)
        return decode_body(MessageType(self.message_type), self.transaction_id, self.body)


def split_frames(data: bytes) -> list[Frame]:
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 8 : pos + 12], "big")
        out.append(Frame(data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big"),
                         int.from_bytes(data[pos + 4 : pos + 8], "big"),
                         data[pos + 12 : pos + 12 + length]))
        pos += 12 + length
    assert pos == len(data)
    return out


def errors_in(data: bytes) -> list[Any]:
    """The ERROR messages in an octet string of frames."""
    return [f.decode() for f in split_frames(data) if f.message_type == MessageType.ERROR]


def bulk_frame(mtype: MessageType, tid: int, entries: list[bytes], *, count: int | None = None,
               first: bool = True, more: bool = False) -> bytes:
    """One raw bulk fragment: header IEs (first fragment) and already-encoded entry IEs."""
    body = bulk_header_ies(mtype, count if count is not None else len(entries)) if first else b""
    return encode_frame(mtype, tid, body + b"".join(entries), more=more)


def reg_entry(uid: str | bytes, *extra: bytes) -> bytes:
    raw = uid.encode() if isinstance(uid, str) else uid
    return encode_ie(IEI.REGISTRATION_ENTRY, encode_ie(IEI.UE_SERVICE_ID, raw) + b"".join(extra))


class Pair:
    """A gateway and a server Session wired back to back (h11's ConnectionPair), with `now`."""

    def __init__(self, server_limits: Limits | None = None,
                 gateway_limits: Limits | None = None, now: float = 0.0) -> None:
        self.now = now
        self.server = Session(Role.SERVER, now, server_limits)
        self.gateway = Session(Role.GATEWAY, now, gateway_limits)

    def handshake(self, *, bulk_allowed: bool = True, ue_auth: bool = False,
                  sync: bool = False) -> None:
        gw, sv = self.gateway, self.server
        gw.send_hello(Hello(gw.next_transaction_id(), 2, node_name="gw1",
                            max_frame_size=gw.limits.max_frame_size))
        (hello,) = self.to_server()
        assert isinstance(hello, HelloReceived)
        sv.accept_hello(server_nonce=NONCE, bulk_allowed=bulk_allowed,
                        ue_authentication_required=ue_auth, node_name="msgd",
                        sync_supported=sync)
        self.to_gateway()

    def to_server(self, extra: bytes = b"") -> list[Event]:
        """Move the gateway's pending octets (plus `extra`) to the server; its events."""
        data = self.gateway.data_to_send() + extra
        if data:
            self.server.receive_data(data, self.now)
        return drain(self.server)

    def to_gateway(self, extra: bytes = b"") -> list[Event]:
        data = self.server.data_to_send() + extra
        if data:
            self.gateway.receive_data(data, self.now)
        return drain(self.gateway)


def of_type(events: list[Any], cls: type) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def entry_ies(frames: list[Frame], entry_iei: int) -> list[bytes]:
    return [raw for f in frames if f.message_type in BULK_MESSAGES
            for iei, raw in split_ies(f.body) if iei == entry_iei]


ENTRY_OF = {t: int(s.entry) for t, s in BULK_SPECS.items()}
