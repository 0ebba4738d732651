"""`python -m bench --scenarios overload`: the overload contract shown (docs/protocol.md §7).

Server E (a fresh msgd with the default [overload] table):
  1. closed-loop single registrations from the pool gateways: the rate C this machine serves;
  2. open loop at C / 2 for singles_s: the p99 of a server with room (the reference);
  3. open loop at 2 x C for overload_s; `overload_s / 4` into it a msgd.client run
     (GatewaySession, one more gateway) registers overload_client_n UEs with single procedures.

Reported: the p99 of the requests accepted at 2 x C against the reference (target: within
5 x), every request answered (success, or SERVER_BUSY with Retry after), connections lost
(target 0), the server's overload episodes (its log lines), and whether the msgd.client run
completed all its work after backing off as told. The pool gateways follow the contract: after
SERVER_BUSY a gateway sends nothing new before its Retry after (requests falling due meanwhile
wait at the gateway). Latency is reported from the moment a request was sent (the server's:
the target) and from the moment it was due (with the wait at the gateway; send_late_p99_ms
says how late the generator sent).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import ue_ids, ue_key
from bench.scenarios import CLIENT_GATEWAY, CLIENT_SEED, POOL_SEED, LoadGen, Msgd, Run

TARGET_RATIO = 5.0


def run_overload(run: Run) -> dict[str, Any]:
    s = run.sizes
    out: dict[str, Any] = {}
    common = {"identities": run.pool_gateways, "pool": s.pool, "seed": POOL_SEED,
              "warmup": s.warmup_s}
    # The closed-loop rate is the capacity: measured without the contract, which would
    # (rightly) refuse part of a closed loop's saturating load.
    server = Msgd(run, "E1-capacity")
    server.config_path = _config(run, "overload-off", "enabled = false")
    server.start()
    try:
        out["closed"] = _singles(run, server, duration=s.singles_s, **common)
    finally:
        server.stop()
    rate = out["closed"]["per_s"]
    server = Msgd(run, "E2-overload")
    server.config_path = _config(run, "overload-on", f"max_delay = {s.overload_max_delay}\n"
                                      f"max_loop_lag = {s.overload_max_loop_lag}")
    out["ready_s"] = server.start()
    try:
        out["half"] = _singles(run, server, rate=rate / 2, duration=s.singles_s, **common)
        log_from = len(server.log_text())
        gen = LoadGen(run, server, "singles", rate=2 * rate, duration=s.overload_s,
                      honor_retry_after=True, **common)
        gen.wait_for("prepared")
        cpu_before = server.cpu_s()
        gen.send()
        # The gateway run starts once the overload is under way (orchestrator pacing, not a
        # synchronisation: the run's outcome does not depend on when it starts).
        time.sleep(s.warmup_s + s.overload_s / 4)
        client: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: client.update(_client_run(run, server.port)))
        thread.start()
        out["double"] = gen.finish()
        out["double"]["server_cpu_s"] = server.cpu_s() - cpu_before
        thread.join()
        out["client"] = client
        log = server.log_text()[log_from:]
        out["episodes_started"] = log.count("event=overload.started")
        out["episodes_ended"] = log.count("event=overload.ended")
    finally:
        out.update({f"server_{k}": v for k, v in server.stop().items()})
    out["derived"] = _derive(out)
    return out


def _config(run: Run, name: str, overload: str) -> Path:
    """The bench's msgd.toml with an [overload] table, as msgd-NAME.toml."""
    assert run.config_path is not None
    path = run.config_path.with_name(f"msgd-{name}.toml")
    text = run.config_path.read_text()
    default = "[overload]\nenabled = false\n"  # the other scenarios' (scenarios.setup)
    assert default in text
    path.write_text(text.replace(default, f"[overload]\n{overload}\n"))
    return path


def _singles(run: Run, server: Msgd, **params: Any) -> dict[str, Any]:
    gen = LoadGen(run, server, "singles", **params)
    gen.wait_for("prepared")
    gen.send()
    return gen.finish()


def _client_run(run: Run, port: int) -> dict[str, Any]:
    """msgd.client (GatewaySession) registering overload_client_n UEs while msgd is
    overloaded: it must back off as told (SERVER_BUSY / ERROR(OVERLOADED) / GOODBYE
    (OVERLOADED) with Retry after) and complete every UE."""
    from msgd.gateway import GatewaySession, GatewayUe, Trace, client_context

    async def main() -> dict[str, Any]:
        pki = run.pki
        ctx = client_context(f"{pki['dir']}/{CLIENT_GATEWAY}.pem",
                             f"{pki['dir']}/{CLIENT_GATEWAY}.key", pki["ca"])
        secret = bytes.fromhex(run.secret)
        ues = [GatewayUe(uid, ue_key(secret, uid))
               for uid in ue_ids(CLIENT_SEED, run.sizes.overload_client_n)]
        trace: list[Trace] = []
        reconnects: list[str] = []
        session = GatewaySession(
            "127.0.0.1", port, ssl_context=ctx, server_hostname="localhost",
            busy_retries=1_000_000, max_attempts=1_000, tracer=trace.append,
            on_reconnect=lambda reason, _delay: reconnects.append(reason))
        started = time.perf_counter()
        async with session:
            # Single procedures: each is a new request the server may refuse (a bulk accepted
            # at its start is finished whatever the load).
            results = [r async for r in session.bulk_register(ues, bulk=False)]
        busy = [t for t in trace if t.event == "busy"]
        return {
            "ues": len(ues),
            "results": len(results),
            "ok": sum(r.ok for r in results),
            "failed": {r.cause_name: 1 for r in results if not r.ok},
            "wall_s": time.perf_counter() - started,
            "busy_answers": len(busy),
            "retry_after_ms": ([min(t.retry_after or 0 for t in busy),
                                max(t.retry_after or 0 for t in busy)] if busy else None),
            "max_attempts": max((r.attempts for r in results), default=0),
            "connections": session.connections,
            "reconnects": reconnects[:10],
        }

    return asyncio.run(main())


def _derive(out: dict[str, Any]) -> dict[str, Any]:
    half, double, client = out["half"], out["double"], out.get("client") or {}
    # The server's latency: from the moment a request was sent (at half load nothing waits
    # at the gateway, so from due is the same there). From due, at 2 x, adds the time
    # requests waited at gateways that backed off as told: shown too, not the target.
    reference = half["accepted_p99_from_send_ms"]
    ratio = double["accepted_p99_from_send_ms"] / reference if reference else None
    # Requests sent and left without an answer (those falling due while their gateway backed
    # off and not sent by the end are `backlog_at_end`: no request, no answer owed).
    answered_all = double["unanswered_at_end"] == 0
    return {
        "closed_loop_per_s": out["closed"]["per_s"],
        "offered_per_s": double["rate_target"],
        "accepted_per_s": double["accepted_per_s"],
        "refused": double["busy"],
        "p99_half_ms": reference,
        "p99_accepted_double_ms": double["accepted_p99_from_send_ms"],
        "p99_accepted_double_from_due_ms": double["accepted_p99_ms"],
        "ratio": ratio,
        "ratio_met": ratio is not None and ratio <= TARGET_RATIO,
        "every_request_answered": answered_all and double["busy_without_retry_after"] == 0
        and set(double["causes"]) <= {"SERVER_BUSY"},
        "connections_lost": double["connections_lost"] + half["connections_lost"],
        "client_completed": bool(client) and client["ok"] == client["ues"],
        "not_sent_at_end": double["backlog_at_end"],
    }


def render(result: dict[str, Any]) -> str:
    d = result["derived"]
    double, half, client = result["double"], result["half"], result.get("client") or {}

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f}"

    rows = [
        ("closed-loop single registrations", f"{d['closed_loop_per_s']:,.0f}", "reg/s", ""),
        ("offered, open loop (2 x)", f"{d['offered_per_s']:,.0f}", "req/s", ""),
        ("  accepted", f"{d['accepted_per_s']:,.0f}", "reg/s", ""),
        ("  refused: SERVER_BUSY with Retry after", f"{d['refused']:,}", "req", ""),
        ("  Retry after min / p50 / max", " / ".join(
            f"{v:,.0f}" for v in double["retry_after_ms"] or ()) or "-", "ms", ""),
        ("  p99 of accepted requests (from send)", ms(d["p99_accepted_double_ms"]), "ms", ""),
        ("  p99 of accepted requests (from due: with the gateways' back-off)",
         ms(d["p99_accepted_double_from_due_ms"]), "ms", ""),
        ("  p99 of refusals", ms(double["busy_p99_ms"]), "ms", ""),
        ("p99 at half load (reference)", ms(d["p99_half_ms"]), "ms", ""),
        ("ratio accepted p99 / half-load p99", ms(d["ratio"]), "x",
         f"<= {TARGET_RATIO:g}: {'yes' if d['ratio_met'] else '**no**'}"),
        ("every request sent answered (success, or SERVER_BUSY with Retry after)",
         str(d["every_request_answered"]), "", "True"),
        ("  due, not sent by the end (window full, or backing off)", f"{d['not_sent_at_end']:,}",
         "req", ""),
        ("connections lost", str(d["connections_lost"]), "", "0"),
        ("load generator late p99 (2 x / half)",
         f"{ms(double['send_late_p99_ms'])} / {ms(half['send_late_p99_ms'])}", "ms", ""),
        ("overload episodes (log lines started / ended)",
         f"{result['episodes_started']} / {result['episodes_ended']}", "", ""),
        ("msgd.client run: UEs completed", f"{client.get('ok', 0):,} of "
         f"{client.get('ues', 0):,}", "", "all"),
        ("  SERVER_BUSY/OVERLOADED answers it backed off on",
         f"{client.get('busy_answers', 0):,}", "", ""),
        ("  connections, wall", f"{client.get('connections', 0)}, "
         f"{client.get('wall_s', 0):.1f} s", "", ""),
    ]
    lines = ["| overload (docs/protocol.md §7) | value | unit | target |", "|---|---:|---|---|"]
    lines += [f"| {a} | {b} | {c} | {t} |" for a, b, c, t in rows]
    return "\n".join(lines)
