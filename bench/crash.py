"""The crash campaign: `python -m bench.crash --rounds N [--json PATH]`.

A real msgd (`python -m msgd`, mutual TLS, SQLite synchronous=full) with a registry of
`--registered` UEs (100 000 by default) among `--population` provisioned ones, killed with
SIGKILL once per round at a random instant, then restarted on the file the kill left. Each
round, at the same time (bench/crash_load.py, its own process): a BULK REGISTRATION of
`--bulk` unregistered UEs, a BULK DE-REGISTRATION of `--bulk` registered ones, and single
(de-)registrations from `--singles-gateways` gateways. The rounds take turns aiming the kill:

  bulk_register, bulk_deregister, singles   after a random number of that stream's answers
               (up to half the bulk, or of 3 000 singles: most of the round is in flight)
  compaction   a random time into `msgctl registry compact` (registry.compact, asked after a
               random number of answers, up to a quarter of the bulk), from the moment msgd
               logs its start, within the last compaction's duration
  reload       likewise into a reload (SIGHUP: configuration, TLS, and the 100 000+ UEs of
               the provisioning file re-read)

Online compactions also start on their own ([registry] compact_journal_changes is low), so
other kills land in them too; the log says which kills did (a compaction or reload that
started and did not end).

After each kill, on a copy of the file and WAL as the kill left them: PRAGMA integrity_check,
and every UE's registration against the gateways' log of answers. A UE must be as its last
acknowledged change left it, or as a later change left it that was sent but not answered
(durable changes form a prefix of those submitted); a UE no change touched must be as it
was. "lost" counts acknowledged changes not found. Then msgd restarts on the original file:
READY (sd_notify) is timed from the spawn. `--rounds 3 --small` is the test suite's short
version (tests/hostile/test_crash_campaign.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import ue_ids, ue_key
from bench.scenarios import ROOT, Msgd, Run, Sizes, raise_nofile

FOCUSES = ("bulk_register", "bulk_deregister", "singles", "compaction", "reload")
BULK_GATEWAY = "gw-bulk"
_LOADED = re.compile(r"registry \S+: (\d+) registrations, \d+ provisioned, loaded in ([\d.]+) s "
                     r"\(journal (\d+) ops replayed\)")
_COMPACTED = re.compile(r"online compaction \(\w+\) folded .* in ([\d.]+) s")


@dataclass
class Campaign:
    """Sizes and state of one campaign."""

    rounds: int
    population: int = 150_000
    registered: int = 100_000
    bulk: int = 15_000
    singles_gateways: int = 4
    singles_pool: int = 2_000
    singles_changes: int = 6_000
    seed: int = 20261206
    focuses: tuple[str, ...] = FOCUSES
    expected: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def small(cls, rounds: int) -> Campaign:
        return cls(rounds, population=12_000, registered=8_000, bulk=2_500,
                   singles_gateways=2, singles_pool=500, singles_changes=1_500)


def _setup(work: Path, camp: Campaign, sock: Path) -> tuple[Run, list[str], dict[str, list[str]]]:
    from msgd.tls.devpki import init_dir

    singles = [f"gw-single-{i}" for i in range(camp.singles_gateways)]
    run = Run(work, Sizes())
    pki = init_dir(work / "pki", gateways=[BULK_GATEWAY, *singles],
                   server_names=("localhost", "127.0.0.1"))
    run.pki = {"dir": str(work / "pki"), "ca": str(pki.ca.cert),
               "server_cert": str(pki.server.cert), "server_key": str(pki.server.key)}
    secret = bytes.fromhex(run.secret)
    bulk_ues = ue_ids("crash", camp.population)
    pools = {gw: ue_ids(f"crash-{gw}", camp.singles_pool) for gw in singles}
    with open(work / "ues.csv", "w") as out:
        out.write("ue_service_id,key,gateways\n")
        for gw, ids in ((BULK_GATEWAY, bulk_ues), *pools.items()):
            out.writelines(f"{uid},{ue_key(secret, uid).hex()},{gw}\n" for uid in ids)
    policies = "\n".join(
        f'[[gateways]]\nidentity = "{gw}"\nue_authentication = true\nbulk_allowed = true\n'
        for gw in [BULK_GATEWAY, *singles])
    run.config_path = work / "msgd.toml"
    # Compactions start on their own about once a round; bulk_window lets each bulk
    # connection have its whole bulk unanswered (many changes in flight at the kill).
    run.config_path.write_text(f"""# written by python -m bench.crash
[server]
listen = "127.0.0.1:0"
node_name = "msgd-crash"
[tls]
certificate = "{pki.server.cert}"
private_key = "{pki.server.key}"
gateway_ca = "{pki.ca.cert}"
[registry]
path = "registry.sqlite"
synchronous = "full"
compact_journal_changes = {max(1_000, camp.bulk * 2)}
compact_journal_ratio = 0.1
compact_min_interval = 0
[provisioning]
file = "ues.csv"
[limits]
bulk_window = {max(4096, camp.bulk + 1)}
[control]
socket = "{sock}"
[log]
level = "info"
{policies}
""")
    camp.expected = dict.fromkeys(bulk_ues)
    for ids in pools.values():
        camp.expected.update(dict.fromkeys(ids))
    return run, bulk_ues, pools


class _Load:
    """bench/crash_load.py for one round: its progress lines read in a thread."""

    def __init__(self, run: Run, server: Msgd, name: str, **params: Any) -> None:
        self.out = run.dir / f"crash-{name}.json"
        params = {"host": "127.0.0.1", "port": server.port, "pki": run.pki,
                  "secret": run.secret, "bulk_identity": BULK_GATEWAY, "out": str(self.out),
                  **params}
        path = run.dir / f"crash-{name}-params.json"
        path.write_text(json.dumps(params))
        self.err = run.dir / f"crash-{name}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.crash_load", "--params", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True)
        self.progress: dict[str, Any] = {}
        self.prepared = threading.Event()
        self.changed = threading.Condition()
        self.done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if message["event"] == "prepared":
                    self.prepared.set()
                elif message["event"] == "progress":
                    self.progress = message
                elif message["event"] == "done":
                    self.done = True
                self.changed.notify_all()
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def go(self, timeout: float = 300) -> None:
        if not self.prepared.wait(timeout):
            raise RuntimeError(f"load generator not prepared: {self.err.read_text()[-2000:]}")
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_until(self, stream: str, count: int, timeout: float = 300) -> bool:
        """Until `stream` has `count` answers (True), or the round ended first (False)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.progress.get(stream, 0) < count:
                if self.done:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{stream} did not reach {count} answers")
                self.changed.wait(left)
        return True

    def result(self, timeout: float = 120) -> dict[str, Any]:
        self._thread.join(timeout)
        self.proc.wait(timeout)
        if self.proc.returncode != 0 or not self.out.exists():
            raise RuntimeError(f"load generator failed: {self.err.read_text()[-3000:]}")
        return json.loads(self.out.read_text())


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _crash_copy(path: Path, into: Path) -> Path:
    """The registry as the kill left it (file and WAL), so that the restart replays the
    original while the copy is checked."""
    into.mkdir(parents=True, exist_ok=True)
    copy = into / path.name
    for suffix in ("", "-wal"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            shutil.copyfile(source, Path(f"{copy}{suffix}"))
    return copy


def _check(copy: Path, camp: Campaign, ops: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """Every UE against the answers (module doc); updates camp.expected to what was found."""
    from msgd.registry.compaction import CompactionPolicy
    from msgd.registry.store import Registry

    registry = Registry.open(copy, compaction=CompactionPolicy(journal_changes=0))
    acked = lost = invented = unanswered_applied = unanswered = failures = 0
    bad: list[tuple[str, Any, Any]] = []
    try:
        for uid, before in camp.expected.items():
            found_reg = registry.registration(uid)
            found = None if found_reg is None else found_reg.gateway
            changes = ops.get(uid, [])
            last_ok = max((i for i, (_s, r) in enumerate(changes) if r == 0), default=-1)
            acked += sum(1 for _s, r in changes if r == 0)
            failures += sum(1 for _s, r in changes if r not in (0, None))
            settled = changes[last_ok][0] if last_ok >= 0 else before
            later = [s for s, r in changes[last_ok + 1:] if r != 0]
            unanswered += sum(1 for _s, r in changes[last_ok + 1:] if r is None)
            if found == settled:
                pass
            elif found in later:
                unanswered_applied += 1
            elif last_ok >= 0:
                lost += 1
                bad.append((uid, settled, found))
            else:
                invented += 1
                bad.append((uid, settled, found))
            camp.expected[uid] = found
        registered = registry.registered_count()
    finally:
        registry.close_sync()
    return {"acknowledged": acked, "lost": lost, "invented": invented,
            "unanswered": unanswered, "unanswered_applied": unanswered_applied,
            "failures": failures, "registered": registered, "bad": bad[:5]}


def _between(text: str, start: str, ends: tuple[str, ...]) -> bool:
    """Whether the last `start` in text has no `ends` after it (the kill came inside)."""
    at = text.rfind(start)
    return at >= 0 and not any(end in text[at:] for end in ends)


def run_campaign(camp: Campaign, work: Path, out_json: Path | None = None) -> dict[str, Any]:
    raise_nofile()
    rng = random.Random(camp.seed)
    sock_dir = Path(tempfile.mkdtemp(prefix="msgd-crash-", dir="/tmp"))
    started = time.perf_counter()
    run, bulk_ues, pools = _setup(work, camp, sock_dir / "ctl")
    path = work / "registry.sqlite"
    server = Msgd(run, "crash")
    first_ready = server.start()
    # The registry: `registered` UEs in one bulk, no kill.
    initial = rng.sample(bulk_ues, camp.registered)
    load = _Load(run, server, "initial", register=initial, deregister=[], singles={},
                 singles_changes=0, seed=camp.seed)
    load.go()
    result = load.result(600)
    if result["ok"] != camp.registered:
        raise RuntimeError(f"initial registration: {result['ok']} of {camp.registered}")
    for uid in initial:
        camp.expected[uid] = BULK_GATEWAY
    # How long a compaction and a reload take here, for the first rounds that aim at them
    # (then learned from the logs as rounds go).
    offset = len(server.log_text())
    _compact_now(sock_dir / "ctl")
    server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    _wait_for_log(server, "event=reload.done", offset)
    setup_log = server.log_text()[offset:]
    compact_est = float(_COMPACTED.findall(setup_log)[-1])
    reload_est = _reload_seconds(setup_log) or 1.0
    rounds: list[dict[str, Any]] = []
    totals = {"acknowledged": 0, "lost": 0, "invented": 0, "unanswered": 0,
              "unanswered_applied": 0, "failures": 0}
    try:
        for number in range(camp.rounds):
            focus = camp.focuses[number % len(camp.focuses)]
            registered_now = [u for u in bulk_ues if camp.expected[u] == BULK_GATEWAY]
            free = [u for u in bulk_ues if camp.expected[u] is None]
            register = rng.sample(free, min(camp.bulk, len(free)))
            deregister = rng.sample(registered_now, min(camp.bulk, len(registered_now)))
            singles = {gw: {u: camp.expected[u] for u in ids} for gw, ids in pools.items()}
            offset = len(server.log_text())
            load = _Load(run, server, f"r{number}", register=register, deregister=deregister,
                         singles=singles, singles_changes=camp.singles_changes,
                         seed=camp.seed + number)
            plan: dict[str, Any] = {"focus": focus}
            compactor: threading.Thread | None = None
            load.go()
            if focus in ("bulk_register", "bulk_deregister", "singles"):
                stream = {"bulk_register": "register", "bulk_deregister": "deregister",
                          "singles": "singles"}[focus]
                limit = min(3_000, camp.singles_changes) if focus == "singles" else camp.bulk
                target = rng.randint(1, max(1, limit // 2 if focus != "singles" else limit))
                plan["after_answers"] = target
                plan["before_end"] = load.wait_until(stream, target)
            else:
                # Some changes answered first, so that acknowledged ones are at stake too.
                load.wait_until("register", rng.randint(1, max(1, camp.bulk // 4)))
                if focus == "compaction":
                    compactor = threading.Thread(target=_compact_now, args=(sock_dir / "ctl",),
                                                 daemon=True)
                    compactor.start()
                    began, estimate = "online compaction (manual) started", compact_est
                else:
                    server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
                    began, estimate = "event=reload.started", reload_est
                _wait_for_log(server, began, offset)
                delay = rng.uniform(0, estimate)
                plan["after_s"] = round(delay, 3)
                time.sleep(delay)  # the random instant (not a synchronisation)
            server.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            server.proc.wait()  # type: ignore[union-attr]
            if compactor is not None:
                compactor.join(30)
            log = server.log_text()[offset:]
            plan["in_compaction"] = _between(log, "online compaction (", ("folded", "failed"))
            plan["in_reload"] = _between(log, "event=reload.started",
                                         ("event=reload.done", "event=reload.failed"))
            durations = [float(x) for x in _COMPACTED.findall(server.log_text())]
            if durations:
                compact_est = max(0.05, statistics.median(durations[-9:]))
            reload_est = max(0.05, _reload_seconds(log) or reload_est)
            result = load.result()
            copy = _crash_copy(path, work / "crash-copy")
            integrity = _integrity(copy)
            check = _check(copy, camp, result["ops"])
            in_flight = check["unanswered"]  # sent, no answer when the connections died
            shutil.rmtree(copy.parent)
            server = Msgd(run, f"crash-{number + 1}")
            ready = server.start()
            loaded = _LOADED.findall(server.log_text())
            record = {"round": number, **plan, "in_flight_at_kill": in_flight,
                      "integrity_check": integrity, "restart_ready_s": round(ready, 3),
                      "registry_load_s": float(loaded[-1][1]) if loaded else None,
                      "journal_replayed": int(loaded[-1][2]) if loaded else None,
                      **{k: v for k, v in check.items() if k != "bad"}}
            if check["bad"]:
                record["bad"] = check["bad"]
            rounds.append(record)
            for key in totals:
                totals[key] += check[key]
            print(f"round {number}: {focus:<15} in flight {in_flight:>6}, "
                  f"acked {check['acknowledged']:>6}, lost {check['lost']}, "
                  f"integrity {integrity}, restart {ready:.2f} s"
                  f"{', in compaction' if plan['in_compaction'] else ''}"
                  f"{', in reload' if plan['in_reload'] else ''}",
                  file=sys.stderr, flush=True)
            if integrity != "ok" or check["lost"] or check["invented"]:
                break  # evidence: stop here, leave the files
    finally:
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    summary = {
        "rounds": len(rounds),
        "registry_registered_min": min((r["registered"] for r in rounds), default=None),
        "in_flight_at_kill": _spread([r["in_flight_at_kill"] for r in rounds]),
        "rounds_with_10000_in_flight": sum(r["in_flight_at_kill"] >= 10_000 for r in rounds),
        "kills_in_compaction": sum(r["in_compaction"] for r in rounds),
        "kills_in_reload": sum(r["in_reload"] for r in rounds),
        "by_focus": {f: sum(r["focus"] == f for r in rounds) for f in camp.focuses},
        "integrity_ok": sum(r["integrity_check"] == "ok" for r in rounds),
        "restart_ready_s": _spread([r["restart_ready_s"] for r in rounds]),
        "first_ready_s": first_ready,
        **totals,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    report = {"campaign": {k: v for k, v in camp.__dict__.items() if k != "expected"},
              "summary": summary, "rounds": rounds}
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _wait_for_log(server: Msgd, needle: str, offset: int, timeout: float = 60) -> None:
    """Poll the daemon's log for `needle` after `offset` (an observable condition)."""
    deadline = time.monotonic() + timeout
    while needle not in server.log_text()[offset:]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} not logged within {timeout} s")
        time.sleep(0.005)


def _compact_now(sock: Path) -> None:
    """registry.compact over the control socket; the kill usually ends it first."""
    from msgd.cli.admin import ControlClient
    from msgd.errors import MsgdError

    try:
        with ControlClient(sock, timeout=60) as client:
            client.request("registry.compact")
    except (MsgdError, OSError):
        pass


def _reload_seconds(log: str) -> float | None:
    stamps = re.findall(r"ts=(\S+) \S+ event=reload\.(started|done)", log)
    start = next((t for t, kind in reversed(stamps) if kind == "started"), None)
    done = next((t for t, kind in reversed(stamps) if kind == "done"), None)
    if start is None or done is None:
        return None
    began, ended = (dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (start, done))
    return (ended - began).total_seconds()


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def render(report: dict[str, Any]) -> str:
    s = report["summary"]
    c = report["campaign"]
    return "\n".join([
        f"crash campaign: {s['rounds']} rounds of kill -9, registry of {c['registered']:,}+ "
        f"UEs ({c['population']:,} provisioned), bulks of {c['bulk']:,}, "
        f"{c['singles_gateways']} singles gateways",
        f"acknowledged changes checked: {s['acknowledged']:,}; lost: {s['lost']}; "
        f"changed without a request: {s['invented']}",
        f"unanswered at the kills: {s['unanswered']:,} (of which applied: "
        f"{s['unanswered_applied']:,}); in flight at a kill: {s['in_flight_at_kill']}; "
        f"rounds with 10 000 or more in flight: {s['rounds_with_10000_in_flight']}",
        f"integrity_check ok: {s['integrity_ok']} of {s['rounds']}; kills inside a compaction:"
        f" {s['kills_in_compaction']}, inside a reload: {s['kills_in_reload']}",
        f"restart to READY: {s['restart_ready_s']} s; by focus: {s['by_focus']}",
        f"wall time {s['wall_s']} s",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crash",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="small sizes (the test suite's)")
    parser.add_argument("--population", type=int)
    parser.add_argument("--registered", type=int)
    parser.add_argument("--bulk", type=int)
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--focus", nargs="+", choices=FOCUSES, help="rounds take these turns")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    camp = Campaign.small(args.rounds) if args.small else Campaign(args.rounds)
    for name in ("population", "registered", "bulk"):
        if getattr(args, name) is not None:
            setattr(camp, name, getattr(args, name))
    camp.seed = args.seed
    if args.focus:
        camp.focuses = tuple(args.focus)
    work = Path(tempfile.mkdtemp(prefix="msgd-crash-", dir=args.dir))
    passed = False
    try:
        report = run_campaign(camp, work, args.json)
        print(render(report))
        s = report["summary"]
        passed = (s["lost"] == 0 and s["invented"] == 0
                  and s["integrity_ok"] == s["rounds"] == camp.rounds)
    finally:
        if args.keep or not passed:  # a failed campaign's files are the evidence
            print(f"bench.crash: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
