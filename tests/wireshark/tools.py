"""Running the real tshark and dumpcap on the dissector, and reading what they decoded.

tshark is Debian's (`apt-get install tshark`, which brings dumpcap in wireshark-common); a
missing program fails the test and names the package. Both run as whatever user runs the
tests: as root, Debian's init.lua keeps `run_user_scripts_when_superuser = true`, so
`-X lua_script:` works (tshark prints a warning about root on stderr, which is the one stderr
line tolerated).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from wire.constants import IEI, SERVER_TID_BIT, MessageType
from wire.messages import encode_frame, encode_ie

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "contrib" / "wireshark" / "msgin5g.lua"

# _ws.expert.severity values (epan/proto.h PI_*).
SEVERITY = {0x200000: "chat", 0x400000: "note", 0x600000: "warn", 0x800000: "error"}
# What a Lua error or an exception in a dissector leaves in the tree.
CRASH_FIELDS = {"_ws.lua.error", "_ws.malformed.expert", "_ws.malformed.dissector_bug",
                "_ws.malformed.reassembly"}
ROOT_WARNING = 'Running as user "root" and group "root". This could be dangerous.'


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} not found: install the Debian package {package} "
                    f"(as root: apt-get install {package}; `make test` does it through "
                    f".ci/debian-deps)", pytrace=False)
    return path


def load_gen_tables():
    """contrib/wireshark/gen_tables.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_tables", ROOT / "contrib" / "wireshark" / "gen_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the spec vectors as streams -------------------------------------------------------------

# Sent by the server (the rest by the gateway), so each stream has the direction it would have.
FROM_SERVER = {MessageType.HELLO_ACK, MessageType.UE_REGISTRATION_RESPONSE,
               MessageType.UE_DEREGISTRATION_RESPONSE, MessageType.BULK_REGISTRATION_RESPONSE,
               MessageType.BULK_DEREGISTRATION_RESPONSE, MessageType.ERROR, MessageType.GOODBYE,
               MessageType.DIGEST_RESPONSE, MessageType.LIST_RESPONSE}

def frames_of(vector: dict) -> bytes:
    data = bytes.fromhex(vector["hex"])
    if vector["name"] == "credential_register":
        # Not a frame but one IE (the proof of wire-v1 §6): carried in the UE REGISTRATION
        # REQUEST it belongs to, with the UE Service ID it was computed over.
        uid = vector["decoded"]["ue_service_id"].encode()
        data = encode_frame(MessageType.UE_REGISTRATION_REQUEST, 1,
                            encode_ie(IEI.UE_SERVICE_ID, uid) + data)
    return data


def from_server(data: bytes) -> bool:
    tid = int.from_bytes(data[4:8], "big")
    return data[1] in FROM_SERVER or (data[1] == MessageType.KEEPALIVE
                                      and bool(tid & SERVER_TID_BIT))


# --- PDML ------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    show: str
    value: str
    showname: str
    children: list[Node] = field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def all(self, name: str) -> list[Node]:
        return [n for n in self.walk() if n.name == name]

    def values(self, name: str) -> list[str]:
        return [n.show for n in self.all(name)]

    def one(self, name: str) -> str:
        found = self.values(name)
        assert len(found) == 1, f"{name}: {found} in {self.showname}"
        return found[0]

    def experts(self) -> list[Expert]:
        out = []
        for node in self.all("_ws.expert"):
            kinds = [c.name for c in node.children if c.name.startswith("msgin5g.expert.")]
            severity = next(int(c.show) for c in node.children
                            if c.name == "_ws.expert.severity")
            message = next(c.show for c in node.children if c.name == "_ws.expert.message")
            out.append(Expert(kinds[0] if kinds else "", SEVERITY.get(severity, "?"), message))
        return out


@dataclass(frozen=True)
class Expert:
    kind: str  # msgin5g.expert.NAME
    severity: str
    message: str


@dataclass
class Packet:
    number: int
    layers: list[Node]  # the <proto> elements
    stream: int | None = None  # tcp.stream

    @property
    def pdus(self) -> list[Node]:
        return [p for p in self.layers if p.name == "msgin5g"]

    def text(self) -> str:
        return "\n".join(n.name + " " + n.showname for p in self.layers for n in p.walk())


def _node(elem: ET.Element) -> Node:
    return Node(elem.get("name", ""), elem.get("show", ""), elem.get("value", ""),
                elem.get("showname", ""), [_node(c) for c in elem])


def parse_pdml(text: str) -> list[Packet]:
    packets = []
    for pkt in ET.fromstring(text).iter("packet"):
        layers = [_node(p) for p in pkt]
        fields = {n.name: n.show for layer in layers for n in layer.walk()
                  if n.name in ("frame.number", "tcp.stream")}
        stream = fields.get("tcp.stream")
        packets.append(Packet(int(fields["frame.number"]), layers,
                              int(stream) if stream is not None else None))
    return packets


# --- tshark ----------------------------------------------------------------------------------


def tshark(pcap: Path, *args: str, decode_as: bool = False,
           keylog: Path | None = None, lua: Path = LUA) -> str:
    """Run tshark on `pcap` with the dissector; return stdout. Fails on any stderr line other
    than the root warning (a Lua error while loading or dissecting shows up there)."""
    exe = require("tshark", "tshark")
    cmd = [exe, "-n", "-r", str(pcap), "-X", f"lua_script:{lua}"]
    if decode_as:
        cmd += ["-d", "tcp.port==7554,msgin5g"]
    if keylog is not None:
        cmd += ["-o", f"tls.keylog_file:{keylog}"]
    cmd += list(args)
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    noise = [line for line in proc.stderr.splitlines() if line.strip() and line != ROOT_WARNING]
    assert proc.returncode == 0 and not noise, (
        f"tshark exited {proc.returncode}: {' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def decode(pcap: Path, *, decode_as: bool = False, keylog: Path | None = None) -> list[Packet]:
    """The packets of `pcap` that carry msgin5g, as PDML with the layers the tests read (two
    passes, so requests link to later responses), after checking that no packet carries a Lua
    error or the mark of an exception (a dissector reading past its data).

    The dissector's own expert infos of the Malformed group add a hidden `_ws.malformed` item
    too; those are findings about the bytes, not failures, so only an exception's marks count.
    """
    crash_filter = " || ".join(sorted(CRASH_FIELDS))
    crashes = tshark(pcap, "-2", "-Y", crash_filter, "-T", "fields", "-e", "frame.number",
                     "-e", "_ws.expert.message", decode_as=decode_as, keylog=keylog)
    assert not crashes.strip(), f"Lua errors or exceptions (frame, messages):\n{crashes}"
    packets = parse_pdml(tshark(
        pcap, "-2", "-T", "pdml", "-J", "frame tcp tls msgin5g", "-Y", "msgin5g",
        decode_as=decode_as, keylog=keylog))
    for packet in packets:
        bad = [f"{n.name}: {n.show} {n.showname}" for layer in packet.layers
               for n in layer.walk() if n.name in CRASH_FIELDS
               or "Lua Error" in n.show + n.showname or "Malformed Packet:" in n.showname]
        assert not bad, f"frame {packet.number}: {bad}\n{packet.text()}"
    return packets


# --- capturing on loopback -------------------------------------------------------------------


class LoopbackCapture:
    """dumpcap on `lo`, writing pcap to a pipe that a thread reads as it arrives.

    The capture filter takes one TCP port plus a UDP port of our own. dumpcap says
    "Capturing on" before its capture is live, so readiness is proved instead: a probe
    datagram is sent to that UDP port (a socket bound here on 127.0.0.1) until one comes back
    through the pipe. The same kind of probe after the session marks its end: once it is in the
    pipe, every packet before it is too (one interface, kernel order).
    """

    def __init__(self, tcp_port: int) -> None:
        self.tcp_port = tcp_port
        self._sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sink.bind(("127.0.0.1", 0))
        self.probe_port = self._sink.getsockname()[1]
        self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._data = bytearray()
        self._seen: set[bytes] = set()
        self._cond = threading.Condition()
        self._eof = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = b""

    def __enter__(self) -> LoopbackCapture:
        exe = require("dumpcap", "wireshark-common")
        bpf = f"tcp port {self.tcp_port} or (udp and dst port {self.probe_port})"
        self.proc = subprocess.Popen([exe, "-q", "-i", "lo", "-f", bpf, "-P", "-w", "-"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()
        self.probe(b"ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_err(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        offset = 24  # pcap global header
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 20):
            with self._cond:
                self._data += chunk
                while len(self._data) >= offset + 16:
                    caplen = int.from_bytes(self._data[offset + 8:offset + 12], "little")
                    if len(self._data) < offset + 16 + caplen:
                        break
                    pkt = bytes(self._data[offset + 16:offset + 16 + caplen])
                    offset += 16 + caplen
                    # Ethernet 14 + IPv4 20 + UDP 8, then our marker.
                    if len(pkt) > 42 and pkt[23] == 17:
                        self._seen.add(pkt[42:])
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def probe(self, marker: bytes, timeout: float = 20.0) -> None:
        """Send `marker` to the probe port until the capture has delivered it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while marker not in self._seen:
                if self._eof:
                    raise RuntimeError(f"dumpcap stopped: {self.stderr.decode(errors='replace')}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the capture never delivered probe {marker!r}")
                self._sender.sendto(marker, ("127.0.0.1", self.probe_port))
                # Woken by the reader thread when packets arrive; the probe is resent if the
                # capture was not live yet when it went out.
                self._cond.wait(0.1)

    def stop(self) -> bytes:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self._reader.join(10)
            self._err.join(10)
        self._sink.close()
        self._sender.close()
        return bytes(self._data)

    def write(self, path: Path) -> Path:
        path.write_bytes(bytes(self._data))
        return path
