"""The benchmark scenarios: a real msgd child, the load generator child, and what they measure.

The orchestrator (this process) makes a throwaway PKI, a provisioning CSV of bench UEs with
keys derived from a random per-run secret, and an msgd.toml; then for each scenario it starts
`python -m msgd --config ...` (NOTIFY_SOCKET set, so READY=1 is observed exactly as systemd
sees it), runs `python -m bench.loadgen ...` against it and samples the server's memory from
/proc. Nothing here drives traffic itself: the load generator is a separate process.

Server lifetimes (each a fresh process, so one scenario's garbage does not blur the next):
  A  first start: provisioning of every bench UE is loaded (reported, not a target)
  B  empty registry: connection setup and 10,000 idle connections
  C  empty registry: bulk registration of n UEs (RSS sampled throughout); SIGTERM compacts
  D  n registered: start to READY and RSS (registry memory = D - C at READY); single
     registrations from many gateways; bulk de-registration of the n UEs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ceilings, tls_echo_floor
from bench.loadgen import ue_ids, ue_key
from bench.vcpu_speed import SpeedProbe, quiet_latencies

ROOT = Path(__file__).resolve().parent.parent
BULK_GATEWAY = "gw-bulk"
BULK_SEED = "bulk"
POOL_SEED = "pool"
CLIENT_GATEWAY = "gw-client"  # the msgd.client run of the overload scenario
CLIENT_SEED = "client"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; `quick` is the smoke run of the test suite."""

    bulk_n: int = 1_000_000
    sqlite_n: int = 1_000_000
    gateways: int = 100
    pool: int = 1_000  # UEs per gateway for single registrations (re-registered in turn)
    singles_s: float = 10.0
    warmup_s: float = 2.0
    idle_connections: int = 10_000
    connect_concurrency: int = 64
    tls_stream_s: float = 3.0
    tls_handshake_s: float = 5.0
    # The soak (bench/soak.py; `--scenarios soak`, not part of the default run).
    soak_n: int = 1_000_000  # UEs registered before the churn
    soak_gateways: int = 8
    soak_s: float = 1800.0  # seconds of churn
    soak_sample_s: float = 60.0
    soak_calibrate_s: float = 20.0  # closed-loop churn that measures capacity
    soak_load: float = 0.5  # the churn's rate as a share of that capacity
    soak_bulk: int = 500  # UEs per bulk (a pair: de-register them, register them again)
    soak_single_share: float = 0.3  # share of the changes sent as single procedures
    soak_compact_changes: int = 100_000  # [registry] compact_journal_changes
    soak_compact_ratio: float = 0.25  # [registry] compact_journal_ratio (its default)
    soak_compact_interval: float = 10.0
    # A lone single (`--scenarios lone`, bench/lone.py): open-loop rates, seconds at each.
    lone_rates: str = "2000,6000,12000,20000"
    lone_s: float = 5.0
    # The overload scenario (`--scenarios overload`, bench/overload.py): open-loop singles
    # at 2 x the closed-loop rate for overload_s, and a msgd.client run of overload_client_n.
    overload_s: float = 60.0
    overload_client_n: int = 5_000
    overload_max_delay: float = 0.25  # [overload] max_delay of the server under test
    overload_max_loop_lag: float = 0.05  # [overload] max_loop_lag

    @classmethod
    def quick(cls) -> Sizes:
        return cls(bulk_n=2_000, sqlite_n=20_000, gateways=4, pool=50, singles_s=1.0,
                   warmup_s=0.3, idle_connections=40, connect_concurrency=8,
                   tls_stream_s=0.3, tls_handshake_s=0.5, overload_s=2.0,
                   overload_client_n=200)


@dataclass
class Run:
    """One benchmark run's directory, PKI, secret and settings."""

    dir: Path
    sizes: Sizes
    synchronous: str = "full"
    profile: bool = False
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    pki: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None

    @property
    def pool_gateways(self) -> list[str]:
        return [f"gw-{i:03d}" for i in range(self.sizes.gateways)]


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    import sqlite3
    import ssl

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "openssl": ssl.OPENSSL_VERSION,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# --- set-up ----------------------------------------------------------------------------------


def setup(run: Run) -> dict[str, float]:
    """PKI, provisioning CSV (every bench UE with its key) and msgd.toml; returns timings."""
    from msgd.tls.devpki import init_dir

    started = time.perf_counter()
    pki_dir = run.dir / "pki"
    pki = init_dir(pki_dir, gateways=[BULK_GATEWAY, CLIENT_GATEWAY, *run.pool_gateways],
                   server_names=("localhost", "127.0.0.1"))
    run.pki = {"dir": str(pki_dir), "ca": str(pki.ca.cert), "server_cert": str(pki.server.cert),
               "server_key": str(pki.server.key)}
    pki_s = time.perf_counter() - started
    started = time.perf_counter()
    secret = bytes.fromhex(run.secret)
    with open(run.dir / "ues.csv", "w") as out:
        out.write("ue_service_id,key,gateways\n")
        groups = [(BULK_GATEWAY, ue_ids(BULK_SEED, run.sizes.bulk_n)),
                  (CLIENT_GATEWAY, ue_ids(CLIENT_SEED, run.sizes.overload_client_n))]
        groups += [(gw, ue_ids(f"{POOL_SEED}-{i}", run.sizes.pool))
                   for i, gw in enumerate(run.pool_gateways)]
        for gw, ids in groups:
            out.writelines(f"{uid},{ue_key(secret, uid).hex()},{gw}\n" for uid in ids)
    csv_s = time.perf_counter() - started
    gateways = "\n".join(
        f'[[gateways]]\nidentity = "{gw}"\nue_authentication = true\nbulk_allowed = true\n'
        for gw in [BULK_GATEWAY, CLIENT_GATEWAY, *run.pool_gateways])
    run.config_path = run.dir / "msgd.toml"
    run.config_path.write_text(f"""# written by python -m bench
[server]
listen = "127.0.0.1:0"
node_name = "msgd-bench"
[tls]
certificate = "{pki.server.cert}"
private_key = "{pki.server.key}"
gateway_ca = "{pki.ca.cert}"
[registry]
path = "registry.sqlite"
synchronous = "{run.synchronous}"
[provisioning]
file = "ues.csv"
[limits]
max_connections = {run.sizes.idle_connections + 2_000}
# The connections scenario opens idle_connections / gateways sessions per identity within
# seconds, which is the scenario, not a reconnect storm: with the default (60 per 10 s) a
# machine doing more than 600 handshakes a second held only 6,000 of 10,000.
reconnect_limit = {run.sizes.idle_connections}
[log]
level = "info"
# Capacity and saturated latency, as before the overload contract (docs/protocol.md §7):
# bench/overload.py replaces this table with its own.
[overload]
enabled = false
{gateways}
""")
    return {"pki_s": pki_s, "csv_s": csv_s}


# --- the server child --------------------------------------------------------------------------

_LISTENING = re.compile(r"event=server\.listening address=127\.0\.0\.1:(\d+)")
_LOADED = re.compile(r"loaded in ([0-9.]+) s")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


class Msgd:
    """`python -m msgd --config ...` with NOTIFY_SOCKET; READY=1 timed from the spawn."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name
        self.log_path = run.dir / f"msgd-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready_s = 0.0
        self.config_path = run.config_path  # another file for a variant of the configuration

    def start(self, timeout: float = 900.0) -> float:
        notify_path = self.run.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        env.pop("WATCHDOG_USEC", None)
        assert self.config_path is not None
        with open(self.log_path, "ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "msgd", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            deadline = started + timeout
            while True:
                try:
                    data = notify.recv(4096)
                except TimeoutError:
                    data = b""
                if b"READY=1" in data.split(b"\n"):
                    self.ready_s = time.perf_counter() - started
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"msgd exited {self.proc.returncode}: {self.log_text()[-3000:]}")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"msgd not READY within {timeout} s")
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)
        match = _LISTENING.search(self.log_text())
        if match is None:
            raise RuntimeError("READY=1 but no listening address in the log")
        self.port = int(match.group(1))
        return self.ready_s

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def registry_load_s(self) -> float | None:
        found = _LOADED.findall(self.log_text())
        return float(found[-1]) if found else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return _status_kib(self.pid, "VmRSS:") * 1024

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def settle(self, quiet: float = 0.05, window: float = 0.25, limit: float = 30.0) -> float:
        """Wait until the server is idle (under `quiet` of a CPU over `window`); seconds waited.

        Memory read while it still works through a backlog would count transient buffers.
        """
        started = time.perf_counter()
        before = self.cpu_s()
        while time.perf_counter() - started < limit:
            time.sleep(window)
            now = self.cpu_s()
            if now - before < quiet * window:
                break
            before = now
        return time.perf_counter() - started

    def hwm(self) -> int:
        return _status_kib(self.pid, "VmHWM:") * 1024

    def reset_hwm(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc is not None
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return {"exit_code": code, "stop_s": time.perf_counter() - started}


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread; keeps the maximum."""

    def __init__(self, server: Msgd, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, self.server.rss())
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Profiler:
    """py-spy on the server while a scenario runs (raw collapsed stacks, per thread).

    Blocking mode (the process is paused ~10 µs per sample, 100 samples/s): non-blocking
    sampling tears stacks under this load and mis-attributes time.
    """

    def __init__(self, run: Run, server: Msgd, name: str) -> None:
        self.enabled = run.profile
        self.path = run.dir / f"profile-{name}.txt"
        self.server = server
        self.proc: subprocess.Popen[bytes] | None = None
        self.seconds = 0.0

    def __enter__(self) -> Profiler:
        self._started = time.perf_counter()
        if self.enabled:
            py_spy = Path(sys.executable).with_name("py-spy")
            if not py_spy.exists():
                raise RuntimeError(f"--profile needs py-spy ({py_spy}): pip install -e '.[bench]'")
            self.proc = subprocess.Popen(
                [str(py_spy), "record", "--pid",
                 str(self.server.pid), "--rate", "100", "--format", "raw", "--threads",
                 "--output", str(self.path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)

    def summary(self, top: int = 15) -> dict[str, Any] | None:
        if not self.enabled or not self.path.exists():
            return None
        summary = summarize_profile(self.path.read_text(), top)
        for thread in summary.values():
            # Samples are taken only while a thread runs Python or is in a syscall/C call
            # that py-spy counts as active: 100 samples/s at most.
            thread["busy_pct"] = round(thread["samples"] / (self.seconds * 100) * 100, 1)
        return summary


def _function(frame: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file.py)': aggregate a function's lines."""
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def summarize_profile(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive share of samples per function, per thread, from py-spy raw output."""
    threads: dict[str, dict[str, Counter[str]]] = {}
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        name = "?"
        if frames and frames[0].startswith("thread ("):
            # "thread (1234): MainThread" with --threads
            name = frames[0].partition(": ")[2] or frames[0]
            frames = frames[1:]
        bucket = threads.setdefault(name, {"self": Counter(), "incl": Counter()})
        totals[name] += count
        funcs = [_function(f) for f in frames]
        if funcs:
            bucket["self"][funcs[-1]] += count
            for func in set(funcs):
                bucket["incl"][func] += count
    out: dict[str, Any] = {}
    for name, bucket in threads.items():
        total = totals[name]
        out[name] = {
            "samples": total,
            "self_pct": [
                (f, round(100 * c / total, 1)) for f, c in bucket["self"].most_common(top)],
            "inclusive_pct": [
                (f, round(100 * c / total, 1)) for f, c in bucket["incl"].most_common(top)],
        }
    return out


# --- the load generator child ----------------------------------------------------------------


_LOADGEN_NUMBERS = itertools.count(1)


class LoadGen:
    """`python -m bench.loadgen MODE --params FILE`: JSON lines out, one "go" line in."""

    def __init__(self, run: Run, server: Msgd, mode: str, **params: Any) -> None:
        params = {"host": "127.0.0.1", "port": server.port, "pki": run.pki,
                  "secret": run.secret, **params}
        # A sequence number, not the time: two generators made in the same millisecond once
        # shared one params file, and both de-registered the same half of the two-node bulk.
        self.name = f"{mode}-{params.get('op', '')}-{next(_LOADGEN_NUMBERS):04d}"
        path = run.dir / f"loadgen-{self.name}.json"
        with open(path, "x") as file:  # never another generator's file
            file.write(json.dumps(params))
        self.stderr_path = run.dir / f"loadgen-{self.name}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", mode, "--params", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True)

    def wait_for(self, event: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise RuntimeError(
                    f"load generator exited {self.proc.returncode} before {event!r}: "
                    f"{self.stderr_path.read_text()[-3000:]}")
            message = json.loads(line)
            if message.get("event") == event:
                return message

    def send(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> dict[str, Any]:
        result = self.wait_for("result")
        self.proc.wait(60)
        return result


# --- scenarios -------------------------------------------------------------------------------


def run_ceilings(run: Run) -> dict[str, Any]:
    s = run.sizes
    return {
        "sqlite_insert": ceilings.sqlite_insert(run.dir / "ceiling.sqlite", s.sqlite_n,
                                                run.synchronous),
        "fsync": ceilings.fsync_latency(run.dir, 50 if s.bulk_n < 100_000 else 500),
        "tls_stream": ceilings.tls_stream(run.pki, BULK_GATEWAY, s.tls_stream_s),
        "tls_handshake": ceilings.tls_handshake(run.pki, BULK_GATEWAY, s.tls_handshake_s),
        "tls_idle_memory": ceilings.tls_idle_memory(
            run.pki, BULK_GATEWAY, min(s.idle_connections, 2_000)),
    }


def first_start(run: Run) -> dict[str, Any]:
    """Server A: the first start loads provisioning (every bench UE) into the registry file."""
    server = Msgd(run, "A-provisioning")
    ready = server.start()
    stop = server.stop()
    sizes = run.sizes
    return {"ready_s": ready, "provisioned": sizes.bulk_n + sizes.overload_client_n
            + sizes.gateways * sizes.pool, **stop}


def connections(run: Run) -> dict[str, Any]:
    """Server B: mutual TLS + HELLO per second, then that many connections held idle."""
    server = Msgd(run, "B-connections")
    server.start()
    try:
        gen = LoadGen(run, server, "connect", identities=run.pool_gateways,
                      count=run.sizes.idle_connections,
                      concurrency=run.sizes.connect_concurrency)
        server.settle()
        rss_before = server.rss()
        cpu_before = server.cpu_s()
        with Profiler(run, server, "connect") as profiler:
            gen.send()
            holding = gen.wait_for("holding")
        cpu = server.cpu_s() - cpu_before
        # The server may still be writing its last HELLO ACKs: read RSS once it is idle.
        settled = server.settle()
        rss_holding = server.rss()
        gen.send("close")
        result = gen.finish()
    finally:
        stop = server.stop()
    opened = holding["opened"]
    return {
        "wanted": run.sizes.idle_connections,
        "opened": opened,
        "alive_at_end": result["alive_at_end"],
        "handshakes_per_s": holding["per_s"],
        "connect_wall_s": holding["wall_s"],
        "failures": holding["failures"],
        "rss_before": rss_before,
        "rss_holding": rss_holding,
        "rss_per_connection": (rss_holding - rss_before) / opened if opened else None,
        "settle_s": settled,
        "server_cpu_s": cpu,
        "server_cpu_ms_per_connection": cpu / opened * 1000 if opened else None,
        "loadgen_cpu_s": holding["loadgen_cpu_s"],
        "profile": profiler.summary(),
        **{f"server_{k}": v for k, v in stop.items()},
    }


def bulk_register(run: Run) -> dict[str, Any]:
    """Server C: empty registry, one gateway registers every bulk UE in one bulk."""
    server = Msgd(run, "C-bulk-register")
    ready_empty = server.start()
    try:
        server.settle()
        rss_ready = server.rss()
        gen = LoadGen(run, server, "bulk", op="register", n=run.sizes.bulk_n, seed=BULK_SEED,
                      identity=BULK_GATEWAY)
        gen.wait_for("prepared")
        rss_before = server.rss()
        hwm_reset = server.reset_hwm()
        cpu_before = server.cpu_s()
        with RssSampler(server) as sampler, Profiler(run, server, "bulk-register") as profiler:
            gen.send()
            result = gen.finish()
        cpu = server.cpu_s() - cpu_before
        rss_after = server.rss()
        peak = max(sampler.peak, server.hwm() if hwm_reset else 0)
    finally:
        stop = server.stop()
    return {
        **result,
        "ready_empty_s": ready_empty,
        "rss_ready_empty": rss_ready,
        "rss_before": rss_before,
        "rss_peak": peak,
        "rss_after": rss_after,
        "rss_samples": sampler.samples,
        "server_cpu_s": cpu,
        "server_cpu_us_per_ue": cpu / result["n"] * 1e6,
        "profile": profiler.summary(),
        **{f"server_{k}": v for k, v in stop.items()},
    }


def _cpu_per(result: dict[str, Any], cpu: float, count_key: str) -> None:
    """Server CPU per answered UE: comparable across runs even on a machine shared with
    other work, where wall-clock rates are not."""
    result["server_cpu_s"] = cpu
    count = result[count_key]
    result["server_cpu_us_per_ue"] = cpu / count * 1e6 if count else None


def registered(run: Run) -> dict[str, Any]:
    """Server D: start with every bulk UE registered, single registrations, bulk de-reg."""
    out: dict[str, Any] = {}
    server = Msgd(run, "D-registered")
    out["ready_s"] = server.start()
    try:
        out["registry_load_s"] = server.registry_load_s()
        out["settle_s"] = server.settle()
        out["rss_ready"] = server.rss()
        s = run.sizes
        common = {"identities": run.pool_gateways, "pool": s.pool, "seed": POOL_SEED,
                  "warmup": s.warmup_s, "duration": s.singles_s}
        gen = LoadGen(run, server, "singles", **common)
        gen.wait_for("prepared")
        cpu_before = server.cpu_s()
        with Profiler(run, server, "singles") as profiler:
            gen.send()
            out["singles"] = gen.finish()
        _cpu_per(out["singles"], server.cpu_s() - cpu_before, "answered")
        out["singles"]["profile"] = profiler.summary()
        half = max(1.0, out["singles"]["per_s"] / 2)
        timeline = run.dir / "singles-half-timeline.json"
        gen = LoadGen(run, server, "singles", rate=half, timeline=str(timeline), **common)
        gen.wait_for("prepared")
        cpu_before = server.cpu_s()
        # The p99 here follows the vCPUs' speed (bench/vcpu_speed.py): the run says how much
        # of its window they ran slowed.
        with Profiler(run, server, "singles-half") as profiler, SpeedProbe() as speed:
            gen.send()
            out["singles_half"] = gen.finish()
        out["singles_half"]["vcpu_speed"] = speed.result
        # The same requests where the machine was quiet (bench/vcpu_speed.py): the target is
        # met or not on the whole window; this says how much of the miss is the machine's.
        assert speed.result is not None
        out["singles_half"]["quiet"] = quiet_latencies(
            [tuple(pair) for pair in json.loads(timeline.read_text())], speed.result)
        _cpu_per(out["singles_half"], server.cpu_s() - cpu_before, "answered")
        out["singles_half"]["profile"] = profiler.summary()
        gen = LoadGen(run, server, "bulk", op="deregister", n=s.bulk_n, seed=BULK_SEED,
                      identity=BULK_GATEWAY)
        gen.wait_for("prepared")
        cpu_before = server.cpu_s()
        with Profiler(run, server, "bulk-deregister") as profiler:
            gen.send()
            out["bulk_deregister"] = gen.finish()
        _cpu_per(out["bulk_deregister"], server.cpu_s() - cpu_before, "n")
        out["bulk_deregister"]["profile"] = profiler.summary()
        out["rss_peak"] = server.hwm()
    finally:
        out.update({f"server_{k}": v for k, v in server.stop().items()})
    # The ceiling of the half-load latency: the least a durable single costs in CPython at the
    # same rate on this machine now (bench/tls_echo_floor.py --durable), msgd stopped. A
    # failure costs this row, not msgd's results above.
    cert, key = Path(run.pki["server_cert"]), Path(run.pki["server_key"])
    gateways = len(run.pool_gateways)
    try:
        out["singles_half_floor"] = tls_echo_floor.measure(
            half, gateways, s.singles_s, cert, key, run.dir / "durable-floor.sqlite",
            run.synchronous.upper(), warmup=s.warmup_s)
    except (OSError, RuntimeError, ValueError) as exc:
        out["singles_half_floor"] = {"error": f"{type(exc).__name__}: {exc}"}
    # The same test on the floor itself: closed loop with msgd's gateways and window to its
    # saturated rate, then open loop at half that rate. Whether the half-load p99 target is
    # within CPython's reach on this machine at all (docs/performance.md, "2026-12-07
    # (afternoon)").
    own: dict[str, Any] = {}
    out["floor_own_half"] = own  # what was measured stays if a later part fails
    try:
        own["saturated"] = tls_echo_floor.saturated(
            gateways, out["singles"]["window"], s.singles_s, cert, key,
            run.dir / "durable-floor-saturated.sqlite", run.synchronous.upper(),
            warmup=s.warmup_s)
        own["half"] = tls_echo_floor.measure(
            max(1.0, own["saturated"]["per_s"] / 2), gateways, s.singles_s, cert, key,
            run.dir / "durable-floor-own-half.sqlite", run.synchronous.upper(),
            warmup=s.warmup_s)
    except (OSError, RuntimeError, ValueError) as exc:
        own["error"] = f"{type(exc).__name__}: {exc}"
    return out


def sync(run: Run) -> dict[str, Any]:
    """Server E: every bulk UE registered; registry sync with repair of 10 differences
    (bench/sync.py), then the full re-registration it saves, on the same server."""
    import asyncio

    from bench.sync import first_digest, measure_sync

    server = Msgd(run, "E-sync")
    out: dict[str, Any] = {"ready_s": server.start()}
    try:
        out["registry_load_s"] = server.registry_load_s()
        server.settle()
        out["rss_ready"] = server.rss()
        out["first_digest_s"] = asyncio.run(first_digest(run.pki, server.port, BULK_GATEWAY))
        out["rss_digests_kept"] = server.rss()
        out["sync"] = asyncio.run(measure_sync(run.pki, run.secret, server.port, BULK_GATEWAY,
                                               BULK_SEED, run.sizes.bulk_n))
        gen = LoadGen(run, server, "bulk", op="register", n=run.sizes.bulk_n, seed=BULK_SEED,
                      identity=BULK_GATEWAY)
        gen.wait_for("prepared")
        gen.send()
        full = gen.finish()
        out["full_reregistration"] = {k: full[k] for k in
                                      ("n", "ok", "failed", "wall_s", "request_octets")}
        # The gateway's digests are kept since its first DIGEST REQUEST: what a bulk costs
        # then (every change hashed in), against bulk_register and registered's bulk
        # de-registration, which run with no digests kept.
        for op in ("deregister", "register"):
            gen = LoadGen(run, server, "bulk", op=op, n=run.sizes.bulk_n, seed=BULK_SEED,
                          identity=BULK_GATEWAY)
            gen.wait_for("prepared")
            cpu_before = server.cpu_s()
            gen.send()
            kept = gen.finish()
            _cpu_per(kept, server.cpu_s() - cpu_before, "n")
            out[f"bulk_{op}_digests_kept"] = kept
    finally:
        out.update({f"server_{k}": v for k, v in server.stop().items()})
    return out

