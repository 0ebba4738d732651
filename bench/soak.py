"""The soak (`python -m bench --scenarios soak`): msgd left running under churn.

1. A registry of `soak_n` UEs, split over `soak_gateways` gateways, each registering its
   share in one bulk (bench/loadgen.py, mode bulk).
2. Capacity: `soak_calibrate_s` seconds of churn as fast as msgd answers (closed loop).
3. The soak: `soak_s` seconds of churn at `soak_load` times that capacity (open loop):
   single de-registrations and re-registrations and bulk pairs from every gateway.
   Every `soak_sample_s` seconds a sample: RSS, file size (main + WAL), journal rows and
   changes, compactions so far, and over the interval the p99 of group-commit latency and
   of event-loop lag (from msgd's histograms), the churn rate achieved and its failures.
4. After it: kill -9, start to READY (the journal replayed), and the registered count
   against what the load generator's answers left registered; then SIGTERM (the close
   compacts) and start to READY again.

Verdicts, as issue 13 sets them: RSS and file size within 10 % of their value at the first
sample after the first compaction, READY after the soak within 3 s. `--size soak_s=300`
makes a 5-minute run; tests/bench/test_soak_smoke.py runs a few seconds of it.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadgen import ue_ids, ue_key
from bench.scenarios import LoadGen, Msgd, Run

__all__ = ["histogram_quantile", "run_soak"]

SOAK_SEED = "soak"
_METRICS = re.compile(r"event=metrics\.listening address=(127\.0\.0\.1:\d+)")


def _gateways(run: Run) -> list[str]:
    return [f"gw-soak-{i}" for i in range(run.sizes.soak_gateways)]


def _per_gateway(run: Run) -> int:
    return run.sizes.soak_n // run.sizes.soak_gateways


def setup_soak(run: Run) -> Run:
    """Its own directory, PKI, UEs and msgd.toml (the other scenarios' set-up is not run)."""
    from msgd.tls.devpki import init_dir

    s = run.sizes
    soak = Run(run.dir / "soak", s, synchronous=run.synchronous, secret=run.secret)
    soak.dir.mkdir(parents=True, exist_ok=True)
    gateways = _gateways(run)
    pki = init_dir(soak.dir / "pki", gateways=gateways, server_names=("localhost", "127.0.0.1"))
    soak.pki = {"dir": str(soak.dir / "pki"), "ca": str(pki.ca.cert),
                "server_cert": str(pki.server.cert), "server_key": str(pki.server.key)}
    secret = bytes.fromhex(run.secret)
    with open(soak.dir / "ues.csv", "w") as out:
        out.write("ue_service_id,key,gateways\n")
        for i, gw in enumerate(gateways):
            out.writelines(f"{uid},{ue_key(secret, uid).hex()},{gw}\n"
                           for uid in ue_ids(f"{SOAK_SEED}-{i}", _per_gateway(run)))
    policies = "\n".join(
        f'[[gateways]]\nidentity = "{gw}"\nue_authentication = true\nbulk_allowed = true\n'
        for gw in gateways)
    soak.config_path = soak.dir / "msgd.toml"
    soak.config_path.write_text(f"""# written by python -m bench --scenarios soak
[server]
listen = "127.0.0.1:0"
node_name = "msgd-soak"
[tls]
certificate = "{pki.server.cert}"
private_key = "{pki.server.key}"
gateway_ca = "{pki.ca.cert}"
[registry]
path = "registry.sqlite"
synchronous = "{run.synchronous}"
compact_journal_changes = {s.soak_compact_changes}
compact_journal_ratio = {s.soak_compact_ratio}
compact_min_interval = {s.soak_compact_interval}
[provisioning]
file = "ues.csv"
[metrics]
listen = "127.0.0.1:0"
[log]
level = "info"
# The soak measures the registry under churn; its calibration is a saturating closed loop,
# and the churn counts any refusal as a failure: the overload contract (docs/protocol.md §7)
# is the overload scenario's subject (bench/overload.py).
[overload]
enabled = false
{policies}
""")
    return soak


# --- reading msgd's metrics ----------------------------------------------------------------------


def _scrape(server: Msgd) -> dict[str, Any]:
    found = _METRICS.findall(server.log_text())
    if not found:
        raise RuntimeError("msgd has no metrics listener")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(f"http://{found[-1]}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                values.setdefault(sample.name, {})[float(sample.labels["le"])] = sample.value
            elif sample.labels and sample.name == "msgd_registry_compactions_total":
                values[f"{sample.name}:{sample.labels['result']}"] = sample.value
            elif not sample.labels:
                values[sample.name] = sample.value
    return values


def histogram_quantile(q: float, before: dict[float, float] | None,
                       after: dict[float, float]) -> float | None:
    """The q-quantile of what a Prometheus histogram observed between two scrapes, with
    linear interpolation inside the bucket (as PromQL's histogram_quantile)."""
    bounds = sorted(after)
    counts = [after[b] - (before or {}).get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # above the largest finite bucket: say its bound
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


# --- the soak ------------------------------------------------------------------------------------


class _Lines:
    """A load generator's stdout read in a thread: its tick lines as they come."""

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.ticks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.result: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout = self.gen.proc.stdout
        assert stdout is not None
        for line in stdout:
            message = json.loads(line)
            if message.get("event") == "tick":
                self.ticks.put(message)
            elif message.get("event") == "result":
                self.result = message

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.ticks.get_nowait())
            except queue.Empty:
                return out

    def finish(self, timeout: float) -> dict[str, Any]:
        self._thread.join(timeout)
        self.gen.proc.wait(60)
        if self.result is None:
            raise RuntimeError(f"churn ended without a result: "
                               f"{self.gen.stderr_path.read_text()[-3000:]}")
        return self.result


def _file_bytes(soak: Run) -> tuple[int, int]:
    path = soak.dir / "registry.sqlite"
    sizes = []
    for suffix in ("", "-wal"):
        try:
            sizes.append(Path(f"{path}{suffix}").stat().st_size)
        except FileNotFoundError:
            sizes.append(0)
    return sizes[0], sizes[1]


def _churn(soak: Run, server: Msgd, *, rate: float | None, duration: float,
           report_every: float) -> LoadGen:
    s = soak.sizes
    return LoadGen(soak, server, "churn", identities=_gateways(soak), n=_per_gateway(soak),
                   seed=SOAK_SEED, rate=rate, duration=duration, report_every=report_every,
                   bulk_size=s.soak_bulk, single_share=s.soak_single_share)


def run_soak(run: Run) -> dict[str, Any]:
    s = run.sizes
    started = time.perf_counter()
    soak = setup_soak(run)
    out: dict[str, Any] = {"setup_s": time.perf_counter() - started,
                           "n": _per_gateway(run) * s.soak_gateways,
                           "gateways": s.soak_gateways}
    server = Msgd(soak, "soak")
    out["first_ready_s"] = server.start()
    try:
        # 1. Every gateway registers its UEs.
        t = time.perf_counter()
        registered = 0
        for i, gw in enumerate(_gateways(run)):
            gen = LoadGen(soak, server, "bulk", op="register", n=_per_gateway(run),
                          seed=f"{SOAK_SEED}-{i}", identity=gw)
            gen.wait_for("prepared")
            gen.send()
            result = gen.finish()
            if result["failed"]:
                raise RuntimeError(f"registration of the soak UEs failed: {result['causes']}")
            registered += result["ok"]
        out["register_s"] = time.perf_counter() - t
        out["registered"] = registered

        # 2. Capacity, closed loop.
        gen = _churn(soak, server, rate=None, duration=s.soak_calibrate_s,
                     report_every=s.soak_calibrate_s * 2)
        gen.wait_for("prepared")
        gen.send()
        calibration = gen.finish()
        out["capacity"] = calibration
        rate = max(1.0, calibration["per_s"] * s.soak_load)
        out["rate_target"] = rate
        if calibration["failures"] or calibration["unanswered_at_end"]:
            raise RuntimeError(f"the calibration churn failed: {calibration}")

        # 3. The soak, sampled.
        gen = _churn(soak, server, rate=rate, duration=s.soak_s, report_every=s.soak_sample_s)
        gen.wait_for("prepared")
        lines = _Lines(gen)  # from here on its stdout is read by a thread
        gen.send()
        samples: list[dict[str, Any]] = []
        previous = _scrape(server)
        soak_started = time.perf_counter()
        deadline = soak_started + s.soak_s
        next_sample = soak_started + s.soak_sample_s
        while True:
            time.sleep(max(0.0, min(next_sample, deadline) - time.perf_counter()))
            now = time.perf_counter()
            metrics = _scrape(server)
            main, wal = _file_bytes(soak)
            commit_p99 = histogram_quantile(0.99, previous.get("msgd_group_commit_seconds_bucket"),
                                            metrics["msgd_group_commit_seconds_bucket"])
            lag_p99 = histogram_quantile(
                0.99, previous.get("msgd_event_loop_lag_sample_seconds_bucket"),
                metrics["msgd_event_loop_lag_sample_seconds_bucket"])
            ticks = lines.drain()
            samples.append({
                "t_s": round(now - soak_started, 1),
                "rss_bytes": server.rss(),
                "file_bytes": main + wal,
                "file_main_bytes": main,
                "file_wal_bytes": wal,
                "journal_rows": metrics.get("msgd_registry_journal_rows"),
                "journal_changes": metrics.get("msgd_registry_journal_changes"),
                "journal_bytes": metrics.get("msgd_registry_journal_bytes"),
                "compactions": metrics.get("msgd_registry_compactions_total:success"),
                "compactions_failed": metrics.get("msgd_registry_compactions_total:failure"),
                "last_compaction_s": metrics.get("msgd_registry_last_compaction_duration_seconds"),
                "commit_p99_ms": None if commit_p99 is None else commit_p99 * 1000,
                "loop_lag_p99_ms": None if lag_p99 is None else lag_p99 * 1000,
                "registered_ues": metrics.get("msgd_registered_ues"),
                "churn_per_s": ticks[-1]["per_s"] if ticks else None,
                "churn_failures": ticks[-1]["failures"] if ticks else None,
                "singles_p99_ms": ticks[-1]["singles_p99_ms"] if ticks else None,
                "server_cpu_s": server.cpu_s(),
            })
            previous = metrics
            if now >= deadline:
                break
            next_sample += s.soak_sample_s
        churn = lines.finish(timeout=s.soak_s + 120)
        out["churn"] = churn
        out["samples"] = samples
        out["registered_before_kill"] = _scrape(server).get("msgd_registered_ues")
    except BaseException:
        server.stop()
        raise
    # 4. Restarts: after kill -9 (the journal replayed), then after a clean stop.
    server.proc.kill()  # type: ignore[union-attr]
    server.proc.wait()  # type: ignore[union-attr]
    again = Msgd(soak, "soak-after-kill")
    out["ready_after_kill_s"] = again.start()
    out["registry_load_after_kill_s"] = again.registry_load_s()
    out["registered_after_kill"] = _scrape(again).get("msgd_registered_ues")
    out["stop_after_soak"] = again.stop()
    clean = Msgd(soak, "soak-after-stop")
    out["ready_after_stop_s"] = clean.start()
    clean.stop()
    out["verdict"] = verdict(out)
    out["wall_s"] = time.perf_counter() - started
    return out


def verdict(out: dict[str, Any]) -> dict[str, Any]:
    """Issue 13's targets, computed from the samples."""
    samples = out["samples"]
    baseline = next((x for x in samples if (x["compactions"] or 0) >= 1), None)
    result: dict[str, Any] = {"first_compacted_sample_t_s": baseline and baseline["t_s"]}
    for key in ("rss_bytes", "file_bytes"):
        if baseline is None:
            result[key] = None
            continue
        later = [x[key] for x in samples if x["t_s"] >= baseline["t_s"]]
        ratio = max(later) / baseline[key]
        result[key] = {"baseline": baseline[key], "max_after": max(later),
                       "max_ratio": round(ratio, 3), "flat_within_10pct": ratio <= 1.10}
    result["ready_after_kill_within_3s"] = out["ready_after_kill_s"] <= 3.0
    result["ready_after_stop_within_3s"] = out["ready_after_stop_s"] <= 3.0
    churn = out["churn"]
    result["nothing_lost"] = (churn["unanswered_at_end"] == 0
                              and out["registered_after_kill"] == churn["registered"])
    return result


def render_soak(out: dict[str, Any]) -> str:
    """The samples as a table, then the verdicts."""
    lines = [
        f"soak: {out['n']:,} UEs over {out['gateways']} gateways; churn at "
        f"{out['rate_target']:,.0f} changes/s (capacity {out['capacity']['per_s']:,.0f}/s)",
        "| min | RSS MB | file MB (main+WAL) | journal rows | journal changes | compactions "
        "| commit p99 ms | loop lag p99 ms | churn/s | singles p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(value: Any, scale: float = 1.0, digits: int = 1) -> str:
        return "-" if value is None else f"{value / scale:,.{digits}f}"

    for x in out["samples"]:
        lines.append(
            f"| {x['t_s'] / 60:.1f} | {f(x['rss_bytes'], 1e6)} | {f(x['file_bytes'], 1e6)} "
            f"| {f(x['journal_rows'], digits=0)} | {f(x['journal_changes'], digits=0)} "
            f"| {f(x['compactions'], digits=0)} | {f(x['commit_p99_ms'])} "
            f"| {f(x['loop_lag_p99_ms'])} | {f(x['churn_per_s'], digits=0)} "
            f"| {f(x['singles_p99_ms'])} |")
    v = out["verdict"]
    lines.append("")
    lines.append(f"READY after kill -9: {out['ready_after_kill_s']:.2f} s, after SIGTERM: "
                 f"{out['ready_after_stop_s']:.2f} s; registered after the kill "
                 f"{out['registered_after_kill']:,.0f}, as answered "
                 f"{out['churn']['registered']:,}")
    lines.append(f"verdict: {json.dumps(v)}")
    return "\n".join(lines)
