"""The load generator: gateways driving a real msgd over mutual TLS, in its own process.

    python -m bench.loadgen MODE --params JSON

It speaks wire-v1 with the wire codec directly, not through msgd.gateway, so that what is
measured is the server: after HELLO ACK (the proofs depend on the connection's nonce) it
pre-computes every request (HMAC-SHA256 proof per UE, wire-v1 §6) and every frame, then tells
the orchestrator on stdout `{"event": "prepared"}` and waits for one line on stdin before it
sends anything. Results come back as one JSON line `{"event": "result", ...}`.

Modes:
  bulk     one gateway: one BULK (DE-)REGISTRATION REQUEST of every UE; UE/s, wall time.
  singles  G gateways, each keeping up to the announced outstanding window of single
           UE REGISTRATION REQUESTs in flight (closed loop), or paced at a fixed total rate
           (open loop: each gateway a Poisson process at its share of the rate; latency counts
           from the moment a request was due, so a stall is not hidden by the sender waiting
           for it); registrations/s and latency percentiles.
           With honor_retry_after each gateway sends nothing new before a SERVER_BUSY's Retry
           after (the overload scenario: gateways that follow docs/protocol.md §7).
  connect  N connections (mutual TLS + HELLO/HELLO ACK), `concurrency` at a time; handshakes/s;
           then holds them open (answering KEEPALIVE) until a line on stdin, for memory use.
  churn    G gateways, each changing its own registered UEs for `duration` seconds: single
           re-registrations, and de-registrations each followed by the UE's registration
           (on a quarter of its UEs), and bulk pairs (a BULK DE-REGISTRATION of k UEs, then
           a BULK REGISTRATION of the same k), so that nearly all stay registered; paced at
           a total `rate` of changes/s (or as fast as the server answers: closed loop). A
           {"event": "tick"} line every `report_every` seconds. At the end every UE is
           registered again (the next run starts from there), and the result says how many
           UEs the answers left registered (the soak checks the server against it).

Every response is checked: a UE whose answer is not SUCCESS is counted with its cause.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import random
import resource
import ssl
import struct
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from msgd.tls.reads import TlsReads
from wire.constants import (
    ALPN_PROTOCOL,
    IEI,
    FailureCause,
    GatewayType,
    MessageType,
    Operation,
)
from wire.messages import (
    DeregistrationEntry,
    Hello,
    KeepaliveAck,
    RegistrationEntry,
    UeRegistrationRequest,
    bulk_header_ies,
    decode_body,
    encode_entry,
    encode_message,
)

HEADER = struct.Struct(">BBHII")
LABEL = b"MSGin5G-GW/1\x00"
ALPHABET = bytes(range(0x30, 0x3A)) + bytes(range(0x41, 0x5B)) + bytes(range(0x61, 0x7B))
# byte -> an alphanumeric octet (slightly non-uniform; the keys only need the shape).
_TO_ALNUM = bytes(ALPHABET[b % len(ALPHABET)] for b in range(256))
MT = MessageType


# --- the UEs: the same ids and keys in the orchestrator (CSV) and here (proofs) ------------------


def ue_ids(seed: str, n: int) -> list[str]:
    """n distinct random ASCII UE Service IDs of 20-40 octets, the same for the same seed."""
    rng = random.Random(seed)
    lengths = rng.randbytes(n)
    text = rng.randbytes(40 * n).translate(_TO_ALNUM).decode("ascii")
    ids = [text[40 * i : 40 * i + 20 + lengths[i] % 21] for i in range(n)]
    if len(set(ids)) != n:  # 62^20 makes this practically impossible; say so if it happens
        raise RuntimeError("duplicate UE ids generated")
    return ids


def ue_key(secret: bytes, uid: str) -> bytes:
    """K_ue of a bench UE: derived from the run's random secret (never stored in the repo)."""
    return hashlib.sha256(secret + uid.encode()).digest()


def proof(key: bytes, nonce: bytes, op: int, uid: str) -> bytes:
    """wire-v1 §6, as msgd's wire.credential.compute_proof, with the one-shot C HMAC."""
    return hmac.digest(key, LABEL + nonce + bytes((op,)) + uid.encode(), "sha256")


def entry_ie(iei: int, uid: str, credential: bytes) -> bytes:
    """One bulk entry IE (UE Service ID + credential), hand-packed; checked against the codec."""
    u = uid.encode()
    n = len(u)
    return (bytes((iei,)) + (n + 38).to_bytes(2, "big") + b"\x01" + n.to_bytes(2, "big") + u
            + b"\x02\x00\x20" + credential)


def _check_packing(uid: str, credential: bytes) -> None:
    """Our hand-packed entries and requests must be byte-identical to the wire codec's."""
    assert entry_ie(IEI.REGISTRATION_ENTRY, uid, credential) == encode_entry(
        RegistrationEntry(uid, credential))
    assert entry_ie(IEI.DEREGISTRATION_ENTRY, uid, credential) == encode_entry(
        DeregistrationEntry(uid, credential))
    request = encode_message(UeRegistrationRequest(7, uid, credential))
    assert request[HEADER.size:] == single_body(uid, credential)


def single_body(uid: str, credential: bytes) -> bytes:
    u = uid.encode()
    return b"\x01" + len(u).to_bytes(2, "big") + u + b"\x02\x00\x20" + credential


# --- one connection ----------------------------------------------------------------------------


class Gw(TlsReads):
    """One gateway connection: frames in, callbacks out; HELLO and KEEPALIVE handled here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_frame_size: int = 65_535) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.hello_ack: Any = None
        self.ready: asyncio.Future[Any] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.buf = bytearray()
        self.max_frame_size = max_frame_size
        self.on_frame: Any = None  # (mtype, flags, tid, body) for responses
        self.errors: Counter[str] = Counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            self.ready.set_exception(RuntimeError("no ALPN"))
            transport.abort()  # type: ignore[attr-defined]
            return
        transport.write(encode_message(  # type: ignore[attr-defined]
            Hello(1, int(GatewayType.NON_3GPP), max_frame_size=self.max_frame_size)))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        on_frame = self.on_frame
        while end - pos >= 12:
            _v, mtype, flags, tid, length = HEADER.unpack_from(buf, pos)
            stop = pos + 12 + length
            if stop > end:
                break
            body = bytes(buf[pos + 12 : stop])
            pos = stop
            if mtype >= 0x10 and on_frame is not None:
                on_frame(mtype, flags, tid, body)
            else:
                self._control(mtype, tid, body)
        if pos:
            del buf[:pos]

    def _control(self, mtype: int, tid: int, body: bytes) -> None:
        if mtype == MT.HELLO_ACK:
            self.hello_ack = decode_body(MT.HELLO_ACK, tid, body)
            if not self.ready.done():
                self.ready.set_result(self.hello_ack)
        elif mtype == MT.KEEPALIVE:
            assert self.transport is not None
            self.transport.write(encode_message(KeepaliveAck(tid)))
        elif mtype in (MT.ERROR, MT.GOODBYE):
            message = decode_body(MT(mtype), tid, body)
            self.errors[f"{MT(mtype).name}:{message.error_cause}"] += 1
            if not self.ready.done():
                self.ready.set_exception(RuntimeError(f"server said {message}"))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc or "closed before HELLO ACK")))
        if not self.closed.done():
            self.closed.set_result(None)
        self.can_write.set()


def client_context(pki: dict[str, str], identity: str) -> ssl.SSLContext:
    from msgd.tls.contexts import client_context as make

    return make(f"{pki['dir']}/{identity}.pem", f"{pki['dir']}/{identity}.key", pki["ca"])


async def open_gw(params: dict[str, Any], ctx: ssl.SSLContext) -> Gw:
    loop = asyncio.get_running_loop()
    _transport, gw = await loop.create_connection(
        lambda: Gw(loop), params["host"], params["port"], ssl=ctx, server_hostname="localhost")
    await asyncio.wait_for(gw.ready, 60)
    return gw


def _await_go() -> None:
    print(json.dumps({"event": "prepared"}), flush=True)
    sys.stdin.readline()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _causes(counter: Counter[int]) -> dict[str, int]:
    from wire.constants import FailureCause

    out = {}
    for cause, count in counter.items():
        try:
            out[FailureCause(cause).name] = count
        except ValueError:
            out[str(cause)] = count
    return out


# --- bulk ----------------------------------------------------------------------------------------


async def run_bulk(params: dict[str, Any]) -> dict[str, Any]:
    op = Operation.REGISTRATION if params["op"] == "register" else Operation.DEREGISTRATION
    secret = bytes.fromhex(params["secret"])
    started = time.perf_counter()
    ids = ue_ids(params["seed"], params["n"])
    part = params.get("part")  # [k, parts]: every parts-th UE from the k-th (two nodes' share)
    if part is not None:
        ids = ids[part[0]::part[1]]
    gw = await open_gw(params, client_context(params["pki"], params["identity"]))
    ack = gw.hello_ack
    nonce = ack.server_nonce
    frame_max = ack.max_frame_size
    count = len(ids)
    if count > ack.max_bulk_entries:
        raise RuntimeError(f"{count} UEs, the server takes {ack.max_bulk_entries} per bulk")
    if op is Operation.REGISTRATION:
        rtype, iei = MT.BULK_REGISTRATION_REQUEST, IEI.REGISTRATION_ENTRY
    else:
        rtype, iei = MT.BULK_DEREGISTRATION_REQUEST, IEI.DEREGISTRATION_ENTRY
    _check_packing(ids[0], proof(ue_key(secret, ids[0]), nonce, op, ids[0]))
    frames: list[bytes] = []
    body = bytearray(bulk_header_ies(rtype, count))
    tid = 2
    for uid in ids:
        ie = entry_ie(iei, uid, proof(ue_key(secret, uid), nonce, op, uid))
        if len(body) + len(ie) > frame_max:
            frames.append(HEADER.pack(1, rtype, 1, tid, len(body)) + body)
            body = bytearray()
        body += ie
    frames.append(HEADER.pack(1, rtype, 0, tid, len(body)) + body)
    request_octets = sum(map(len, frames))
    del ids
    prep_s = time.perf_counter() - started

    done = asyncio.get_running_loop().create_future()
    state = {"ok": 0, "failed": 0, "entries": 0, "first_answer": 0.0}
    causes: Counter[int] = Counter()

    def on_frame(mtype: int, flags: int, rtid: int, data: bytes) -> None:
        if rtid != tid:
            return
        if not state["first_answer"]:
            state["first_answer"] = time.perf_counter()
        ok = failed = 0
        p, end = 0, len(data)
        while p < end:
            ie_type = data[p]
            length = (data[p + 1] << 8) | data[p + 2]
            if ie_type == 0x0D or ie_type == 0x0F:
                # value: UE Service ID IE, then the result IE (iei, 0x0001, result)[, cause IE]
                ulen = (data[p + 4] << 8) | data[p + 5]
                result_at = p + 3 + 3 + ulen + 3
                if data[result_at] == 0:
                    ok += 1
                else:
                    failed += 1
                    causes[data[result_at + 4]] += 1
            p += 3 + length
        state["ok"] += ok
        state["failed"] += failed
        state["entries"] += ok + failed
        if not flags & 1 and not done.done():
            done.set_result(time.perf_counter())

    gw.on_frame = on_frame
    await asyncio.to_thread(_await_go)
    cpu0 = _cpu()
    t0 = time.perf_counter()
    transport = gw.transport
    assert transport is not None
    for frame in frames:
        if not gw.can_write.is_set():
            await gw.can_write.wait()
        transport.write(frame)
    frames.clear()
    error_wait = asyncio.ensure_future(gw.closed)
    finished, _ = await asyncio.wait({done, error_wait}, return_when=asyncio.FIRST_COMPLETED)
    if done not in finished:
        raise RuntimeError(f"connection closed during the bulk: {dict(gw.errors)}")
    t1 = done.result()
    cpu = _cpu() - cpu0
    transport.close()
    wall = t1 - t0
    return {
        "n": count,
        "ok": state["ok"],
        "failed": state["failed"],
        "causes": _causes(causes),
        "wall_s": wall,
        "ue_per_s": count / wall,
        "first_answer_ms": (state["first_answer"] - t0) * 1000,
        "request_octets": request_octets,
        "prep_s": prep_s,
        "loadgen_cpu_s": cpu,
        "errors": dict(gw.errors),
    }


# --- singles -------------------------------------------------------------------------------------


class PoissonArrivals:
    """When each of `count` gateways' requests fall due: every gateway an independent Poisson
    process at `rate_each` per second from `start` (their sum is Poisson at the total rate),
    reproducible from `seed`.

    A schedule shared by all gateways (request k of every gateway due at start + k/rate_each)
    made them due at the same instants: a burst of one request per gateway every 1/rate_each
    seconds, which gateways in the field do not coordinate, and which alone put 10-15 ms on
    the median at 1 % of msgd's capacity (docs/performance.md, 2026-12-07).
    """

    def __init__(self, seed: str, count: int, rate_each: float, start: float) -> None:
        self._rate = rate_each
        self._rngs = [random.Random(f"{seed}-{index}") for index in range(count)]
        # A rate of 0 (or less): nothing falls due.
        self._next = [start + rng.expovariate(rate_each) if rate_each > 0 else math.inf
                      for rng in self._rngs]

    def take(self, index: int, now: float, due: deque[float]) -> None:
        """Append to `due` gateway `index`'s due times up to `now`, in order."""
        at = self._next[index]
        if at <= now:
            rng, rate = self._rngs[index], self._rate
            while at <= now:
                due.append(at)
                at += rng.expovariate(rate)
            self._next[index] = at


class _Single:
    """One gateway's closed or open loop of single registrations."""

    def __init__(self, gw: Gw, bodies: list[bytes], window: int, rec: _Recorder,
                 honor_retry_after: bool = False) -> None:
        self.gw = gw
        # A gateway that follows the overload contract (docs/protocol.md §7): after SERVER_BUSY
        # it sends nothing new before Retry after; requests falling due meanwhile wait.
        self.honor_retry_after = honor_retry_after
        self.resume_at = 0.0
        self.sent_at: dict[int, float] = {}
        self.bodies = bodies
        self.next_body = 0
        self.window = window
        self.rec = rec
        self.tid = 1
        self.inflight: dict[int, float] = {}
        self.backlog: deque[float] = deque()  # open loop: due times not yet sent
        self.stopped = False
        gw.on_frame = self.on_frame

    def frame(self, due: float, now: float) -> bytes:
        tid = self.tid = self.tid + 1 if self.tid < 0x7FFF_FFFF else 2
        body = self.bodies[self.next_body]
        self.next_body = (self.next_body + 1) % len(self.bodies)
        self.inflight[tid] = due
        self.sent_at[tid] = now
        return HEADER.pack(1, MT.UE_REGISTRATION_REQUEST, 0, tid, len(body)) + body

    def fill(self, closed_loop: bool) -> None:
        """Send what may be sent now: up to the window (closed) or the due backlog (open)."""
        if self.stopped:
            return
        room = self.window - len(self.inflight)
        if room <= 0:
            return
        out = []
        now = time.perf_counter()
        if closed_loop:
            out = [self.frame(now, now) for _ in range(room)]
        elif now >= self.resume_at:
            backlog = self.backlog
            late = self.rec.send_late
            while backlog and room:
                due = backlog.popleft()
                late.append(now - due)
                out.append(self.frame(due, now))
                room -= 1
        if out:
            assert self.gw.transport is not None
            self.gw.transport.write(b"".join(out))

    def on_frame(self, mtype: int, flags: int, tid: int, body: bytes) -> None:
        sent = self.inflight.pop(tid, None)
        if sent is None:
            return
        sent_at = self.sent_at.pop(tid)
        now = time.perf_counter()
        # Body: UE Service ID IE, then Registration result IE (0x04, 0x0001, result).
        ulen = (body[1] << 8) | body[2]
        result = body[3 + ulen + 3]
        cause = body[3 + ulen + 4 + 3] if result else None
        retry = _retry_after(body, 3 + ulen + 4) if result else None
        self.rec.record(sent, now, cause, retry, sent_at)
        if retry is not None and self.honor_retry_after:
            self.resume_at = max(self.resume_at, now + retry / 1000)
        self.fill(self.rec.closed_loop)


def _retry_after(body: bytes, at: int) -> int | None:
    """The Retry after IE (0x18, u32 ms) among the IEs from `at` on, None without one."""
    end = len(body)
    while at + 3 <= end:
        iei, length = body[at], (body[at + 1] << 8) | body[at + 2]
        if iei == IEI.RETRY_AFTER and length == 4:
            return int.from_bytes(body[at + 3 : at + 7], "big")
        at += 3 + length
    return None


class _Recorder:
    """Answers of single requests: `latencies` of all answered within the measured window,
    and apart, those of successes (`ok_latencies`) and of refusals (SERVER_BUSY)."""

    def __init__(self, closed_loop: bool, measure_from: float, measure_to: float) -> None:
        self.closed_loop = closed_loop
        self.measure_from = measure_from
        self.measure_to = measure_to
        self.latencies: list[float] = []
        self.due: list[float] = []  # when each of `latencies` fell due (perf_counter)
        self.ok_latencies: list[float] = []  # from the time each was due
        self.ok_from_send: list[float] = []  # from the time each was sent
        self.busy_latencies: list[float] = []
        self.retry_after: list[int] = []  # ms, of each SERVER_BUSY
        self.busy_without_retry = 0
        self.send_late: list[float] = []  # open loop: how long after its due time each went
        self.completed = 0
        self.ok = 0
        self.causes: Counter[int] = Counter()

    def record(self, sent: float, now: float, cause: int | None,
               retry_after: int | None = None, sent_at: float = 0.0) -> None:
        if cause is None:
            self.ok += 1
        else:
            self.causes[cause] += 1
            if cause == FailureCause.SERVER_BUSY:
                if retry_after is None:
                    self.busy_without_retry += 1
                else:
                    self.retry_after.append(retry_after)
        if self.measure_from <= sent and now <= self.measure_to:
            self.completed += 1
            self.latencies.append(now - sent)
            self.due.append(sent)
            if cause is None:
                self.ok_latencies.append(now - sent)
                self.ok_from_send.append(now - sent_at)
            elif cause == FailureCause.SERVER_BUSY:
                self.busy_latencies.append(now - sent)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_singles(params: dict[str, Any]) -> dict[str, Any]:
    secret = bytes.fromhex(params["secret"])
    identities: list[str] = params["identities"]
    pool = params["pool"]
    rate = params.get("rate")  # total requests/s (open loop) or None (closed loop)
    started = time.perf_counter()
    gws = await asyncio.gather(
        *(open_gw(params, client_context(params["pki"], identity)) for identity in identities))
    recorder = _Recorder(rate is None, 0.0, 0.0)
    loops = []
    for index, gw in enumerate(gws):
        nonce = gw.hello_ack.server_nonce
        # A gateway's pool is named by its index among all bench gateways (first_index: where
        # this load generator's share of them starts, when several share the gateways).
        ids = ue_ids(f"{params['seed']}-{index + params.get('first_index', 0)}", pool)
        bodies = [single_body(uid, proof(ue_key(secret, uid), nonce, Operation.REGISTRATION, uid))
                  for uid in ids]
        if index == 0:
            _check_packing(ids[0], proof(ue_key(secret, ids[0]), nonce, 1, ids[0]))
        loops.append(_Single(gw, bodies, max(1, gw.hello_ack.max_outstanding), recorder,
                             params.get("honor_retry_after", False)))
    window = loops[0].window
    prep_s = time.perf_counter() - started
    await asyncio.to_thread(_await_go)
    cpu0 = _cpu()
    t0 = time.perf_counter()
    warmup, duration = params["warmup"], params["duration"]
    recorder.measure_from = t0 + warmup
    recorder.measure_to = t0 + warmup + duration
    end = recorder.measure_to
    if rate is None:
        for single in loops:
            single.fill(True)
        await asyncio.sleep(end - t0)
    else:
        arrivals = PoissonArrivals(f"{params['seed']}-arrivals-{params.get('first_index', 0)}",
                                   len(loops), rate / len(loops), t0)
        while (now := time.perf_counter()) < end:
            for index, single in enumerate(loops):
                arrivals.take(index, now, single.backlog)
                single.fill(False)
            await asyncio.sleep(0.001)
    cpu = _cpu() - cpu0
    for single in loops:
        single.stopped = True
    # Let the last answers in (they count towards correctness, not towards the rate).
    deadline = time.perf_counter() + 10
    while any(s.inflight for s in loops) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    unanswered = sum(len(s.inflight) for s in loops)
    backlog = sum(len(s.backlog) for s in loops)
    lost = sum(1 for gw in gws if gw.closed.done())  # closed by the server (or timed out)
    for gw in gws:
        assert gw.transport is not None
        gw.transport.close()
    if params.get("timeline"):  # [due, latency] of each answer measured, for the bench
        Path(params["timeline"]).write_text(
            json.dumps(list(zip(recorder.due, recorder.latencies, strict=True))))
    lat = sorted(recorder.latencies)
    ok_lat = sorted(recorder.ok_latencies)
    busy_lat = sorted(recorder.busy_latencies)
    retry = sorted(recorder.retry_after)
    errors: Counter[str] = Counter()
    for gw in gws:
        errors.update(gw.errors)
    return {
        "gateways": len(gws),
        "window": window,
        "rate_target": rate,
        "duration_s": duration,
        "completed": recorder.completed,
        "answered": recorder.ok + sum(recorder.causes.values()),
        "per_s": recorder.completed / duration,
        "ok": recorder.ok,
        "causes": _causes(recorder.causes),
        "p50_ms": percentile(lat, 0.50) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "p999_ms": percentile(lat, 0.999) * 1000,
        "max_ms": (lat[-1] if lat else float("nan")) * 1000,
        "unanswered_at_end": unanswered,
        "backlog_at_end": backlog,
        "connections_lost": lost,
        "accepted_per_s": len(ok_lat) / duration,
        "send_late_p99_ms": percentile(sorted(recorder.send_late), 0.99) * 1000,
        "accepted_p50_ms": percentile(ok_lat, 0.50) * 1000,
        "accepted_p99_ms": percentile(ok_lat, 0.99) * 1000,
        "accepted_p99_from_send_ms": percentile(sorted(recorder.ok_from_send), 0.99) * 1000,
        "accepted_max_ms": (ok_lat[-1] if ok_lat else float("nan")) * 1000,
        "busy": len(recorder.retry_after) + recorder.busy_without_retry,
        "busy_without_retry_after": recorder.busy_without_retry,
        "busy_p99_ms": percentile(busy_lat, 0.99) * 1000,
        "retry_after_ms": ([retry[0], percentile(retry, 0.5), retry[-1]] if retry else None),
        "prep_s": prep_s,
        "loadgen_cpu_s": cpu,
        "errors": dict(errors),
    }


# --- connect -------------------------------------------------------------------------------------


async def run_connect(params: dict[str, Any]) -> dict[str, Any]:
    identities: list[str] = params["identities"]
    contexts = [client_context(params["pki"], identity) for identity in identities]
    n, concurrency = params["count"], params["concurrency"]
    gws: list[Gw] = []
    failures: Counter[str] = Counter()
    stop = False
    next_index = 0
    await asyncio.to_thread(_await_go)
    cpu0 = _cpu()
    t0 = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index, stop
        while not stop and next_index < n:
            index = next_index
            next_index += 1
            try:
                gws.append(await open_gw(params, contexts[index % len(contexts)]))
            except (OSError, ssl.SSLError, RuntimeError, TimeoutError, ConnectionError) as exc:
                failures[f"{type(exc).__name__}: {exc}"[:200]] += 1
                if sum(failures.values()) >= 20:
                    stop = True  # the limit is reached; say why instead of hammering on

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    holding = {
        "opened": len(gws),
        "wall_s": elapsed,
        "per_s": len(gws) / elapsed if elapsed else 0.0,
        "loadgen_cpu_s": cpu,
        "failures": dict(failures),
    }
    print(json.dumps({"event": "holding", **holding}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    alive = sum(1 for gw in gws if not gw.closed.done())
    for gw in gws:
        if gw.transport is not None:
            gw.transport.abort()
    return {**holding, "alive_at_end": alive}


# --- churn ---------------------------------------------------------------------------------------


class _Churn:
    """One gateway's churn over its own UEs (bench/soak.py): singles on the first quarter,
    bulk pairs on the rest, so that no UE has two changes in flight at once."""

    def __init__(self, gw: Gw, ids: list[str], secret: bytes, stats: _ChurnStats,
                 bulk_size: int, seed: str) -> None:
        self.gw = gw
        self.ids = ids
        self.secret = secret
        self.stats = stats
        self.nonce = gw.hello_ack.server_nonce
        self.frame_max = gw.hello_ack.max_frame_size
        # Leave one outstanding transaction for the bulk in flight.
        self.window = max(1, gw.hello_ack.max_outstanding - 1)
        self.bulk_size = bulk_size
        self.split = max(1, len(ids) // 4)
        self.registered = bytearray(b"\x01") * len(ids)  # the soak registers them all first
        self.rng = random.Random(seed)
        self.tid = 1
        self.singles: dict[int, tuple[int, int, float]] = {}  # tid -> (index, op, sent)
        self.busy: set[int] = set()
        self.back: list[int] = []  # de-registered by a single: registered again next
        self.bulk: dict[str, Any] | None = None
        self.tokens_single = 0.0
        self.tokens_bulk = 0.0
        self.stopped = False
        gw.on_frame = self.on_frame

    def _next_tid(self) -> int:
        self.tid = self.tid + 1 if self.tid < 0x7FFF_FFFF else 2
        return self.tid

    def single(self) -> bytes | None:
        """The frame of one single change of a UE not in flight (None: none found): the
        registration of one a single de-registered, else a re-registration or (one in
        three) a de-registration of a random one."""
        if self.back:
            index = self.back.pop()
        else:
            for _ in range(8):
                index = self.rng.randrange(self.split)
                if index not in self.busy:
                    break
            else:
                return None
        uid = self.ids[index]
        if self.registered[index] and self.rng.random() < 1 / 3:
            op = Operation.DEREGISTRATION
        else:
            op = Operation.REGISTRATION
        body = single_body(uid, proof(ue_key(self.secret, uid), self.nonce, op, uid))
        mtype = (MT.UE_DEREGISTRATION_REQUEST if op is Operation.DEREGISTRATION
                 else MT.UE_REGISTRATION_REQUEST)
        tid = self._next_tid()
        self.singles[tid] = (index, op, time.perf_counter())
        self.busy.add(index)
        return HEADER.pack(1, mtype, 0, tid, len(body)) + body

    def start_pair(self) -> None:
        """A bulk de-registration of k UEs; their re-registration follows when it ends."""
        indices = self.rng.sample(range(self.split, len(self.ids)),
                                  min(self.bulk_size, len(self.ids) - self.split))
        self._send_bulk(Operation.DEREGISTRATION, indices)

    def _send_bulk(self, op: Operation, indices: list[int]) -> None:
        if op is Operation.REGISTRATION:
            rtype, iei = MT.BULK_REGISTRATION_REQUEST, IEI.REGISTRATION_ENTRY
        else:
            rtype, iei = MT.BULK_DEREGISTRATION_REQUEST, IEI.DEREGISTRATION_ENTRY
        tid = self._next_tid()
        frames = []
        body = bytearray(bulk_header_ies(rtype, len(indices)))
        for index in indices:
            uid = self.ids[index]
            ie = entry_ie(iei, uid, proof(ue_key(self.secret, uid), self.nonce, op, uid))
            if len(body) + len(ie) > self.frame_max:
                frames.append(HEADER.pack(1, rtype, 1, tid, len(body)) + body)
                body = bytearray()
            body += ie
        frames.append(HEADER.pack(1, rtype, 0, tid, len(body)) + body)
        self.bulk = {"tid": tid, "op": op, "indices": indices,
                     "by_uid": {self.ids[i]: i for i in indices}}
        assert self.gw.transport is not None
        self.gw.transport.write(b"".join(frames))

    def on_frame(self, mtype: int, flags: int, tid: int, body: bytes) -> None:
        now = time.perf_counter()
        single = self.singles.pop(tid, None)
        stats = self.stats
        if single is not None:
            index, op, sent = single
            self.busy.discard(index)
            ulen = (body[1] << 8) | body[2]
            result = body[3 + ulen + 3]
            if result == 0:
                self.registered[index] = op is Operation.REGISTRATION
                stats.ok += 1
            else:
                stats.causes[body[3 + ulen + 4 + 3]] += 1
            if not self.registered[index] and not self.stopped:
                self.back.append(index)
            stats.latencies.append(now - sent)
            return
        bulk = self.bulk
        if bulk is None or tid != bulk["tid"]:
            return
        p, end = 0, len(body)
        while p < end:
            ie_type = body[p]
            length = (body[p + 1] << 8) | body[p + 2]
            if ie_type == 0x0D or ie_type == 0x0F:
                ulen = (body[p + 4] << 8) | body[p + 5]
                uid = body[p + 6 : p + 6 + ulen].decode()
                result_at = p + 3 + 3 + ulen + 3
                if body[result_at] == 0:
                    self.registered[bulk["by_uid"][uid]] = bulk["op"] is Operation.REGISTRATION
                    stats.ok += 1
                else:
                    stats.causes[body[result_at + 4]] += 1
            p += 3 + length
        if not flags & 1:  # the last response frame of the bulk
            self.bulk = None
            stats.bulks += 1
            if bulk["op"] is Operation.DEREGISTRATION:  # a pair always completes
                self._send_bulk(Operation.REGISTRATION, bulk["indices"])

    def pace(self, dt: float, single_rate: float | None, bulk_rate: float | None) -> None:
        """Send what is due after `dt` seconds (None rates: fill the window, closed loop)."""
        if self.stopped:
            return
        out = []
        if single_rate is None:
            room = self.window - len(self.singles)
        else:
            self.tokens_single = min(self.tokens_single + single_rate * dt, self.window)
            room = min(int(self.tokens_single), self.window - len(self.singles))
        for _ in range(max(0, room)):
            frame = self.single()
            if frame is None:
                break
            out.append(frame)
            if single_rate is not None:
                self.tokens_single -= 1
        if out:
            assert self.gw.transport is not None
            self.gw.transport.write(b"".join(out))
        pair = 2 * self.bulk_size
        if bulk_rate is not None:
            self.tokens_bulk = min(self.tokens_bulk + bulk_rate * dt, 2 * pair)
        if self.bulk is None and (bulk_rate is None or self.tokens_bulk >= pair):
            self.start_pair()
            if bulk_rate is not None:
                self.tokens_bulk -= pair

    @property
    def in_flight(self) -> int:
        return len(self.singles) + (self.bulk is not None)

    def restore(self) -> None:
        """Register again, as singles within the window, the UEs the churn left
        de-registered (after stop: nothing else is in flight for them)."""
        out = []
        room = self.window - len(self.singles)
        for index in range(self.split):
            if room <= 0:
                break
            if self.registered[index] or index in self.busy:
                continue
            uid = self.ids[index]
            op = Operation.REGISTRATION
            body = single_body(uid, proof(ue_key(self.secret, uid), self.nonce, op, uid))
            tid = self._next_tid()
            self.singles[tid] = (index, op, time.perf_counter())
            self.busy.add(index)
            out.append(HEADER.pack(1, MT.UE_REGISTRATION_REQUEST, 0, tid, len(body)) + body)
            room -= 1
        if out:
            assert self.gw.transport is not None
            self.gw.transport.write(b"".join(out))

    def restored(self) -> bool:
        return not self.in_flight and all(self.registered)


class _ChurnStats:
    def __init__(self) -> None:
        self.ok = 0
        self.bulks = 0
        self.causes: Counter[int] = Counter()
        self.latencies: list[float] = []


async def run_churn(params: dict[str, Any]) -> dict[str, Any]:
    secret = bytes.fromhex(params["secret"])
    identities: list[str] = params["identities"]
    per_gw: int = params["n"]
    rate = params.get("rate")  # total changes/s, or None: closed loop
    share = params.get("single_share", 0.3)
    gws = await asyncio.gather(
        *(open_gw(params, client_context(params["pki"], identity)) for identity in identities))
    stats = _ChurnStats()
    churns = [_Churn(gw, ue_ids(f"{params['seed']}-{i}", per_gw), secret, stats,
                     params.get("bulk_size", 500), f"churn-{i}") for i, gw in enumerate(gws)]
    await asyncio.to_thread(_await_go)
    single_rate = None if rate is None else rate * share / len(churns)
    bulk_rate = None if rate is None else rate * (1 - share) / len(churns)
    cpu0 = _cpu()
    t0 = last = tick_at = time.perf_counter()
    every = params.get("report_every", 60.0)
    end = t0 + params["duration"]
    ticked_ok, ticked_causes = 0, Counter()
    while (now := time.perf_counter()) < end:
        for churn in churns:
            churn.pace(now - last, single_rate, bulk_rate)
        last = now
        if now - tick_at >= every:
            lat = sorted(stats.latencies)
            stats.latencies.clear()
            print(json.dumps({
                "event": "tick", "t": now - t0, "changes": stats.ok - ticked_ok,
                "per_s": (stats.ok - ticked_ok) / (now - tick_at),
                "singles_p99_ms": percentile(lat, 0.99) * 1000 if lat else None,
                "failures": _causes(stats.causes - ticked_causes)}), flush=True)
            ticked_ok, ticked_causes, tick_at = stats.ok, Counter(stats.causes), now
        await asyncio.sleep(0.002)
    wall = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    for churn in churns:
        churn.stopped = True
    # Every change sent gets its answer (a bulk de-registration's re-registration too), and
    # the UEs left de-registered are registered again.
    changes = stats.ok
    deadline = time.perf_counter() + 120
    while (not all(c.restored() for c in churns) and time.perf_counter() < deadline
           and not all(gw.closed.done() for gw in gws)):  # (msgd gone: nothing will come)
        for churn in churns:
            churn.restore()
        await asyncio.sleep(0.005)
    unanswered = sum(c.in_flight for c in churns)
    errors: Counter[str] = Counter()
    for gw in gws:
        errors.update(gw.errors)
        assert gw.transport is not None
        gw.transport.close()
    return {
        "gateways": len(gws),
        "rate_target": rate,
        "wall_s": wall,
        "changes": changes,
        "per_s": changes / wall,
        "bulks": stats.bulks,
        "failures": _causes(stats.causes),
        "unanswered_at_end": unanswered,
        "registered": sum(sum(c.registered) for c in churns),
        "loadgen_cpu_s": cpu,
        "errors": dict(errors),
    }


MODES = {"bulk": run_bulk, "singles": run_singles, "connect": run_connect, "churn": run_churn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--params", type=Path, required=True, help="JSON file of parameters")
    args = parser.parse_args(argv)
    params = json.loads(args.params.read_text())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    result = uvloop.run(MODES[args.mode](params))
    print(json.dumps({"event": "result", **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
