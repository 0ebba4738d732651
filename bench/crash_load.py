"""The crash campaign's gateways (`python -m bench.crash_load --params JSON`, started by
bench/crash.py): one round's changes against a real msgd that will be killed mid-way.

Connections, all at once: a BULK REGISTRATION of the UEs in `register`, a BULK
DE-REGISTRATION of those in `deregister` (gateway `bulk_identity`, one connection each), and
on every singles gateway single de-registrations and registrations of its own UEs, one
change per UE at a time, the window full. Every request is sent as soon as it can be, so
that many changes are in flight when msgd dies.

Protocol with the orchestrator: after HELLO ACK it computes every request and prints
{"event": "prepared"}; one line on stdin starts the round. Every 20 ms it prints
{"event": "progress", ...} (answers so far by stream). Once every connection is gone (the
kill), or every answer is in, it writes `out` (JSON): for each UE it touched, its changes
in the order sent, each [state, result] with state the gateway it registers through (None:
de-registration) and result 0 (success), a failure cause, or None (no answer), and prints
{"event": "done"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.loadgen import HEADER, MT, Gw, client_context, entry_ie, proof, single_body, ue_key
from wire.constants import IEI, Operation
from wire.messages import bulk_header_ies

_CLOSED = (OSError, ConnectionError, RuntimeError, TimeoutError)


class Log:
    """Per UE: [state, result] of each change sent, in order."""

    def __init__(self) -> None:
        self.ops: dict[str, list[list[Any]]] = {}
        self.answered = {"register": 0, "deregister": 0, "singles": 0}
        self.ok = 0
        self.failed = 0

    def sent(self, uid: str, state: str | None) -> list[Any]:
        record: list[Any] = [state, None]
        self.ops.setdefault(uid, []).append(record)
        return record

    def answer(self, record: list[Any], result: int, stream: str) -> None:
        record[1] = result
        self.answered[stream] += 1
        if result == 0:
            self.ok += 1
        else:
            self.failed += 1


def _bulk_frames(gw: Gw, secret: bytes, op: Operation, uids: list[str], tid: int) -> list[bytes]:
    if op is Operation.REGISTRATION:
        rtype, iei = MT.BULK_REGISTRATION_REQUEST, IEI.REGISTRATION_ENTRY
    else:
        rtype, iei = MT.BULK_DEREGISTRATION_REQUEST, IEI.DEREGISTRATION_ENTRY
    nonce = gw.hello_ack.server_nonce
    frame_max = gw.hello_ack.max_frame_size
    frames = []
    body = bytearray(bulk_header_ies(rtype, len(uids)))
    for uid in uids:
        ie = entry_ie(iei, uid, proof(ue_key(secret, uid), nonce, op, uid))
        if len(body) + len(ie) > frame_max:
            frames.append(HEADER.pack(1, rtype, 1, tid, len(body)) + body)
            body = bytearray()
        body += ie
    frames.append(HEADER.pack(1, rtype, 0, tid, len(body)) + body)
    return frames


class BulkStream:
    """One bulk transaction on its own connection; answers matched by UE id."""

    def __init__(self, gw: Gw, log: Log, stream: str, records: dict[str, list[Any]],
                 frames: list[bytes]) -> None:
        self.gw = gw
        self.log = log
        self.stream = stream
        self.records = records
        self.frames = frames
        self.done = False
        gw.on_frame = self.on_frame

    def start(self) -> None:
        assert self.gw.transport is not None
        self.gw.transport.write(b"".join(self.frames))
        self.frames = []

    def on_frame(self, mtype: int, flags: int, tid: int, body: bytes) -> None:
        p, end = 0, len(body)
        while p < end:
            ie_type = body[p]
            length = (body[p + 1] << 8) | body[p + 2]
            if ie_type == 0x0D or ie_type == 0x0F:
                ulen = (body[p + 4] << 8) | body[p + 5]
                uid = body[p + 6 : p + 6 + ulen].decode()
                result_at = p + 3 + 3 + ulen + 3
                result = body[result_at]
                cause = 0 if result == 0 else body[result_at + 4]
                self.log.answer(self.records[uid], cause if result else 0, self.stream)
            p += 3 + length
        if not flags & 1:
            self.done = True


class Singles:
    """A gateway toggling its own UEs: de-register the registered, register the others."""

    def __init__(self, gw: Gw, log: Log, secret: bytes, identity: str,
                 states: dict[str, str | None], seed: int) -> None:
        self.gw = gw
        self.log = log
        self.secret = secret
        self.identity = identity
        self.states = states  # as the orchestrator knows them at the start of the round
        self.uids = list(states)
        self.rng = random.Random(seed)
        self.window = max(1, gw.hello_ack.max_outstanding)
        self.inflight: dict[int, tuple[str, list[Any]]] = {}
        self.busy: set[str] = set()
        self.tid = 1
        self.stopped = False
        gw.on_frame = self.on_frame

    def fill(self) -> None:
        if self.stopped or self.gw.transport is None or self.gw.closed.done():
            return
        out = []
        nonce = self.gw.hello_ack.server_nonce
        while len(self.inflight) < self.window:
            uid = self.uids[self.rng.randrange(len(self.uids))]
            if uid in self.busy:
                continue
            registered = self.states[uid] is not None
            op = Operation.DEREGISTRATION if registered else Operation.REGISTRATION
            body = single_body(uid, proof(ue_key(self.secret, uid), nonce, op, uid))
            mtype = MT.UE_DEREGISTRATION_REQUEST if registered else MT.UE_REGISTRATION_REQUEST
            self.tid += 1
            record = self.log.sent(uid, None if registered else self.identity)
            self.inflight[self.tid] = (uid, record)
            self.busy.add(uid)
            out.append(HEADER.pack(1, mtype, 0, self.tid, len(body)) + body)
        if out:
            self.gw.transport.write(b"".join(out))

    def on_frame(self, mtype: int, flags: int, tid: int, body: bytes) -> None:
        entry = self.inflight.pop(tid, None)
        if entry is None:
            return
        uid, record = entry
        self.busy.discard(uid)
        ulen = (body[1] << 8) | body[2]
        result = body[3 + ulen + 3]
        cause = body[3 + ulen + 4 + 3] if result else 0
        self.log.answer(record, cause, "singles")
        if result == 0:
            self.states[uid] = record[0]
        self.fill()


async def _open(params: dict[str, Any], identity: str) -> Gw:
    loop = asyncio.get_running_loop()
    ctx = client_context(params["pki"], identity)
    _transport, gw = await loop.create_connection(
        lambda: Gw(loop), params["host"], params["port"], ssl=ctx, server_hostname="localhost")
    await asyncio.wait_for(gw.ready, 60)
    return gw


async def run(params: dict[str, Any]) -> dict[str, Any]:
    secret = bytes.fromhex(params["secret"])
    log = Log()
    bulk_identity = params["bulk_identity"]
    gws: list[Gw] = []
    bulks: list[BulkStream] = []
    for stream, op, uids, state in (
            ("register", Operation.REGISTRATION, params["register"], bulk_identity),
            ("deregister", Operation.DEREGISTRATION, params["deregister"], None)):
        if not uids:
            continue
        gw = await _open(params, bulk_identity)
        gws.append(gw)
        records = {uid: log.sent(uid, state) for uid in uids}
        bulks.append(BulkStream(gw, log, stream, records, _bulk_frames(gw, secret, op, uids, 2)))
    singles: list[Singles] = []
    for index, (identity, states) in enumerate(params["singles"].items()):
        gw = await _open(params, identity)
        gws.append(gw)
        singles.append(Singles(gw, log, secret, identity, dict(states),
                               params["seed"] * 100 + index))
    print(json.dumps({"event": "prepared", "connections": len(gws)}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    started = time.perf_counter()
    for bulk in bulks:
        bulk.start()
    for one in singles:
        one.fill()
    # Until msgd is gone (every connection closed) or, without a kill, everything answered
    # and the singles have made `singles_changes` changes.
    while True:
        await asyncio.sleep(0.02)
        print(json.dumps({"event": "progress", **log.answered}), flush=True)
        if all(gw.closed.done() for gw in gws):
            break
        if (all(b.done for b in bulks)
                and log.answered["singles"] >= params["singles_changes"]):
            for one in singles:
                one.stopped = True
            if all(not one.inflight for one in singles):
                break
    for gw in gws:
        if gw.transport is not None:
            gw.transport.abort()
    return {"ops": log.ops, "ok": log.ok, "failed": log.failed, "answered": log.answered,
            "wall_s": time.perf_counter() - started}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    args = parser.parse_args(argv)
    params = json.loads(args.params.read_text())
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    result = uvloop.run(run(params))
    Path(params["out"]).write_text(json.dumps(result))
    print(json.dumps({"event": "done", "ok": result["ok"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
