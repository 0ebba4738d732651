"""A tiny pcap writer: TCP streams between 127.0.0.1 ports as Ethernet/IPv4/TCP packets.

Nothing is sent anywhere: the packets are built in memory and written to a file for tshark to
read. Each stream has a handshake, data segments cut where the test says (so frames straddle
segments) and a FIN exchange, with consistent sequence numbers and checksums.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

LOCALHOST = bytes([127, 0, 0, 1])
SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_packet(sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    """One Ethernet frame carrying IPv4/TCP from 127.0.0.1:sport to 127.0.0.1:dport."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = LOCALHOST + LOCALHOST + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
    csum = _checksum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, LOCALHOST, LOCALHOST)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    ether = b"\0" * 12 + b"\x08\x00"
    return ether + ip + tcp + payload


@dataclass
class Capture:
    """Packets in the order they are added, 1 ms apart."""

    packets: list[bytes] = field(default_factory=list)

    def stream(self, client_port: int, server_port: int = 7554) -> TcpStream:
        stream = TcpStream(self, client_port, server_port)
        stream.open()
        return stream

    def write(self, path: Path) -> Path:
        out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
        for n, pkt in enumerate(self.packets):
            sec, usec = divmod(1_700_000_000_000_000 + n * 1000, 1_000_000)
            out.append(struct.pack("<IIII", sec, usec, len(pkt), len(pkt)) + pkt)
        path.write_bytes(b"".join(out))
        return path


@dataclass
class TcpStream:
    capture: Capture
    client_port: int
    server_port: int
    seq: dict[bool, int] = field(default_factory=lambda: {True: 1000, False: 5000})

    def _emit(self, from_client: bool, flags: int, payload: bytes = b"") -> None:
        sport, dport = ((self.client_port, self.server_port) if from_client
                        else (self.server_port, self.client_port))
        seq, ack = self.seq[from_client], self.seq[not from_client]
        self.capture.packets.append(tcp_packet(sport, dport, seq, ack, flags, payload))
        self.seq[from_client] = seq + len(payload) + (1 if flags & (SYN | FIN) else 0)

    def open(self) -> None:
        self.capture.packets.append(tcp_packet(
            self.client_port, self.server_port, self.seq[True], 0, SYN, b""))
        self.seq[True] += 1
        self._emit(False, SYN | ACK)
        self._emit(True, ACK)

    def send(self, data: bytes, *, from_client: bool = True, cuts: Iterable[int] = ()) -> None:
        """`data` in segments split at the offsets `cuts`; each is acknowledged."""
        bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
        for start, end in itertools.pairwise(bounds):
            self._emit(from_client, PSH | ACK, data[start:end])
            self._emit(not from_client, ACK)

    def close(self) -> None:
        self._emit(True, FIN | ACK)
        self._emit(False, FIN | ACK)
        self._emit(True, ACK)
