"""Shared pieces of the hostile-world suite: a well-behaved witness gateway, raw frames, figures.

Every abuse test runs a `Witness` beside the abuser: a gateway that keeps registering and
de-registering its own UEs, single and bulk, and checks every answer. An abuse case passes
only if the witness kept getting correct answers while it ran, and the server's RSS stayed
within `RSS_BOUND` of what it was before the module started.

Set MSGD_SURVIVAL_REPORT=FILE to append the measured figures (JSON lines) to FILE; the
figures in docs/survival.md come from such a run. Nothing is asserted from that file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any

from msgd.gateway import GatewayClient, GatewayUe
from tests.harness import ChildServer, Deployment, Gw, RawGateway, connect, make_deployment
from wire.constants import IEI, MessageType
from wire.credential import compute_proof
from wire.ies import encode_ie
from wire.messages import decode_body, encode_frame

# Growth of the server's RSS an abuse case may cause (the 200k-bulk test allows 64 MiB).
RSS_BOUND = 48 * 1024 * 1024
KEY = bytes(range(32))


def record(case: str, **figures: Any) -> None:
    """Append measured figures for docs/survival.md (only when MSGD_SURVIVAL_REPORT is set)."""
    path = os.environ.get("MSGD_SURVIVAL_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"case": case, **figures}) + "\n")


def provisioning_csv(path: Path, rows: Sequence[tuple[str, Sequence[str]]],
                     key: bytes = KEY) -> None:
    """ue_service_id,key,gateways rows, one key for all (the tests derive proofs from it)."""
    lines = ["ue_service_id,key,gateways"]
    lines += [f"{uid},{key.hex()},{';'.join(gws)}" for uid, gws in rows]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Witness:
    """A well-behaved gateway that keeps working beside an abuser and checks every answer."""

    def __init__(self, dep: Deployment, address: tuple[str, int], uids: Sequence[str],
                 identity: str = "gw2.example") -> None:
        self.dep = dep
        self.address = address
        self.uids = list(uids)
        self.identity = identity
        self.rounds = 0
        self.wrong: list[str] = []
        self._client: GatewayClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = False
        self._progress = asyncio.Event()

    async def __aenter__(self) -> Witness:
        self._client = await connect(self.dep, self.address, self.identity)
        self._task = asyncio.create_task(self._run())
        await self.progressed(1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        assert self._task is not None and self._client is not None
        await self._task
        await self._client.close()
        assert not self.wrong, self.wrong[:5]

    def _ue(self, uid: str) -> GatewayUe:
        return GatewayUe(uid, KEY)

    async def _run(self) -> None:
        client = self._client
        assert client is not None
        single, bulk = self.uids[0], self.uids[1:]
        try:
            while not self._stop:
                got = await client.register(self._ue(single))
                if not (got.ok and got.ue_service_id == single):
                    self.wrong.append(f"register {single}: {got}")
                got = await client.deregister(self._ue(single))
                if not got.ok:
                    self.wrong.append(f"deregister {single}: {got}")
                for op in (client.bulk_register, client.bulk_deregister):
                    answers = [r async for r in op(self._ue(u) for u in bulk)]
                    if [(r.ue_service_id, r.ok) for r in answers] != [(u, True) for u in bulk]:
                        self.wrong.append(f"{op.__name__}: {answers[:3]}")
                self.rounds += 1
                self._progress.set()
        except Exception as exc:  # the witness must never lose its connection
            self.wrong.append(f"witness failed: {exc!r}")
            self._progress.set()

    async def progressed(self, rounds: int = 2, timeout: float = 20.0) -> None:
        """Wait until the witness completes `rounds` more rounds (or fails: then it raises)."""
        target = self.rounds + rounds
        async with asyncio.timeout(timeout):
            while self.rounds < target and not self.wrong:
                self._progress.clear()
                await self._progress.wait()
        assert not self.wrong, self.wrong[:5]


def check_rss(child: ChildServer, baseline: int, case: str) -> int:
    rss = child.rss_bytes()
    record(case, rss_growth_mib=round((rss - baseline) / 2**20, 1))
    assert rss - baseline < RSS_BOUND, (case, baseline, rss)
    return rss


async def read_message(raw: RawGateway, timeout: float = 10.0) -> Any:
    """The next message that is not a KEEPALIVE (which the raw gateway answers)."""
    from wire.messages import KeepaliveAck, encode_message

    while True:
        mtype, _flags, tid, body = await raw.read_frame(timeout)
        if mtype == MessageType.KEEPALIVE:
            raw.writer.write(encode_message(KeepaliveAck(tid)))
            continue
        if mtype in (MessageType.BULK_REGISTRATION_RESPONSE,
                     MessageType.BULK_DEREGISTRATION_RESPONSE):
            return (MessageType(mtype), _flags, tid, body)
        return decode_body(MessageType(mtype), tid, body)


# How a peer's refusal or close shows on our side: EOF, a reset, or a TLS alert. Not a timeout
# (TimeoutError is an OSError too): a server that hangs has neither refused nor closed.
CLOSED = (EOFError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError)


async def closed_by_server(raw: RawGateway, timeout: float = 10.0) -> list[Any]:
    """Read until the server closes; the messages it sent on the way (KEEPALIVEs skipped)."""
    seen: list[Any] = []
    with contextlib.suppress(*CLOSED):
        while True:
            seen.append(await read_message(raw, timeout))
    return seen


async def refused(attempt: Awaitable[Any], within: float = 10.0) -> BaseException:
    """Await `attempt` and return how the server refused it: EOF, a reset or a TLS alert
    (`CLOSED`), within `within` seconds. A timeout, an answer, our own rejection of the
    server's certificate and a connection nobody accepted (ECONNREFUSED) each fail the test.

    An attempt that yields a RawGateway is made to say HELLO: TLS 1.3 lets the client finish
    its handshake before the server has judged the client's certificate, so a refusal may
    only show on the first read. The connection is closed on the way out."""
    raw = None
    try:
        async with asyncio.timeout(within):
            got = await attempt
            if isinstance(got, RawGateway):
                raw = got
                got = await raw.hello()
    except TimeoutError as exc:
        raise AssertionError(f"not refused within {within:g} s (a timeout is no refusal)") from exc
    except CLOSED as exc:
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise AssertionError(f"we rejected the server, it did not refuse us: {exc}") from exc
        return exc
    finally:
        if raw is not None:
            raw.close()
    raise AssertionError(f"not refused: the server answered {got!r}")


def proof(nonce: bytes, op: int, uid: str, key: bytes = KEY) -> bytes:
    return compute_proof(key, nonce, op, uid)


def ie(iei: int, value: bytes) -> bytes:
    return encode_ie(iei, value)


def registration_body(uid: bytes, credential: bytes | None = None, *, prefix: bytes = b"",
                      suffix: bytes = b"") -> bytes:
    """A UE REGISTRATION REQUEST body built by hand (so tests can break it)."""
    body = prefix + ie(IEI.UE_SERVICE_ID, uid)
    if credential is not None:
        body += ie(IEI.UE_CREDENTIAL, credential)
    return body + suffix


def frame(mtype: int, tid: int, body: bytes, *, more: bool = False) -> bytes:
    return encode_frame(mtype, tid, body, more=more)


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), made without a socket."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def wait_for_log(child: ChildServer, needle: str, *, after: int = 0,
                       timeout: float = 20.0) -> str:
    """Poll the child's log (an observable condition, bounded) until `needle` appears."""
    deadline = time.monotonic() + timeout
    while True:
        text = child.log_text()
        if needle in text[after:]:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not logged; log ends {text[-1500:]}")
        await asyncio.sleep(0.02)


def assert_clean_log(child: ChildServer) -> None:
    """No traceback, no unhandled exception, nothing critical: abuse is handled, not survived
    by accident."""
    text = child.log_text()
    for bad in ("Traceback", "Exception in callback", "level=critical", "traceback="):
        assert bad not in text, text[text.find(bad) - 500 : text.find(bad) + 2000]


async def stream_bulk(raw: RawGateway, mtype: MessageType, tid: int, ues: Sequence[str],
                      entry_of: Any, *, pauses: dict[int, asyncio.Event] | None = None,
                      on_answer: Any = None) -> tuple[list[Any], Any]:
    """One bulk request of len(ues) entries, sent in frames of at most 60 000 octets while its
    answers are read (wire-v1 §5 Streaming). Before entry n in `pauses` the frame so far is
    sent (MORE set) and the sender waits for the event. `on_answer(index, entry)` sees every
    response entry as it arrives. Returns (response entries, the ERROR ending the transaction
    or None); stops early, without raising, when the connection ends."""
    from wire.ies import split_ies
    from wire.messages import Error, bulk_header_ies, decode_entry

    count = len(ues)

    async def send() -> None:
        body = bytearray(bulk_header_ies(mtype, count))
        for n, uid in enumerate(ues):
            if pauses and n in pauses:
                raw.writer.write(encode_frame(mtype, tid, bytes(body), more=True))
                body = bytearray()
                await raw.writer.drain()
                await pauses[n].wait()
            value = entry_of(uid)
            if len(body) + len(value) > 60_000:
                raw.writer.write(encode_frame(mtype, tid, bytes(body), more=True))
                body = bytearray()
                await raw.writer.drain()
            body += value
        raw.writer.write(encode_frame(mtype, tid, bytes(body)))
        await raw.writer.drain()

    answers: list[Any] = []
    error = None
    sender = asyncio.create_task(send())
    try:
        while len(answers) < count:
            try:
                got = await read_message(raw, timeout=60)
            except CLOSED:  # a timeout is no close: it propagates and fails the test
                break
            if isinstance(got, Error):
                error = got
                break
            _type, flags, _tid, body = got
            for iei, value in split_ies(body):
                if iei in (IEI.REGISTRATION_RESPONSE_ENTRY, IEI.DEREGISTRATION_RESPONSE_ENTRY):
                    answer = decode_entry(IEI(iei), value)
                    if on_answer is not None:
                        on_answer(len(answers), answer)
                    answers.append(answer)
            if not flags & 1:
                break
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
            await sender
    return answers, error


def witnessed_server(
    directory: Path,
    pki: Any,
    *,
    gateways: Sequence[str],
    limits: dict[str, object],
    witness_ues: Sequence[str],
    abuser_ues: Sequence[str],
) -> Iterator[tuple[Deployment, ChildServer, int]]:
    """A real msgd for a module of abuse tests: the witness UEs belong to gw2.example, the
    abuser's to gw1.example. Yields (deployment, child, RSS baseline); on teardown msgd must
    still be alive, its log clean, and SIGTERM must stop it with exit code 0."""
    dep = make_deployment(directory, pki, gateways=tuple(Gw(g) for g in gateways),
                          limits=limits)
    provisioning_csv(dep.dir / "ues.csv", [(u, ["gw2.example"]) for u in witness_ues]
                     + [(u, ["gw1.example"]) for u in abuser_ues])
    child = ChildServer(dep)
    child.start()
    try:
        yield dep, child, child.rss_bytes()
        assert child.proc is not None and child.proc.poll() is None, "msgd died"
        assert_clean_log(child)
    finally:
        assert child.terminate() == 0
