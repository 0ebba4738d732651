"""The benchmark's smoke run: `python -m bench --quick` must run and report every number.

Speed is measured in bench/, never asserted here: this only keeps the benchmark from rotting
(a renamed API, a changed log line, a scenario that no longer completes). It does check what
the benchmark itself relies on: every UE of the bulks was answered SUCCESS by the server.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every headline row of the table (bench/__main__.py derive()); a missing one is a bug.
TABLE_KEYS = {
    "bulk_register_per_s", "bulk_register_wall_s", "bulk_deregister_per_s",
    "bulk_deregister_wall_s", "bulk_request_mb_per_s", "singles_per_s", "singles_p50_ms",
    "singles_p99_ms", "singles_p999_ms", "singles_half_per_s", "singles_half_p50_ms",
    "singles_half_p99_ms", "singles_half_p999_ms", "singles_half_floor_p99_ms",
    "singles_half_cpu_us", "floor_saturated_per_s", "floor_half_p99_ms",
    "singles_lone_cost_ratio", "singles_half_vcpu_slowed_pct",
    "singles_half_quiet_share_pct", "singles_half_quiet_p99_ms",
    "bulk_register_cpu_us",
    "bulk_deregister_cpu_us", "singles_cpu_us", "rss_peak_mb", "rss_per_registered_ue",
    "rss_per_ue_all_included",
    "rss_growth_beyond_registry_mb", "handshakes_per_s", "handshake_cpu_ms",
    "idle_connections", "rss_per_connection_kb", "ready_s", "ready_empty_s",
}
CEILINGS = {
    "sqlite_insert": "rows_per_s",
    "tls_stream": "mb_per_s",
    "tls_handshake": "per_s",
    "tls_idle_memory": "rss_per_connection",
    "fsync": "p99_ms",
}


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_benchmark_reports_every_number(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--size", "idle_connections=20",
         "--dir", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| bulk registration |" in proc.stdout
    results = json.loads(out.read_text())

    for name, key in CEILINGS.items():
        assert _number(results["ceilings"][name][key]), name
    assert results["ceilings"]["tls_stream"]["ok"] is True
    assert results["machine"]["nproc"] >= 1

    n = results["sizes"]["bulk_n"]
    bulk = results["bulk_register"]
    dereg = results["registered"]["bulk_deregister"]
    for result in (bulk, dereg):
        assert (result["ok"], result["failed"]) == (n, 0), result["causes"]
    for name in ("singles", "singles_half"):
        singles = results["registered"][name]
        assert singles["completed"] > 0 and singles["causes"] == {}, singles
        assert singles["errors"] == {}, singles
    floor = results["registered"]["singles_half_floor"]
    # Journaled: the warm-up's requests too.
    assert floor["journaled"] >= floor["answered"] == floor["requests"] > 0, floor
    assert floor["refused"] == 0, floor
    own = results["registered"]["floor_own_half"]
    saturated, half = own["saturated"], own["half"]
    assert saturated["window"] == results["registered"]["singles"]["window"], own
    assert saturated["requests"] == saturated["window"] * saturated["connections"] + \
        saturated["answered"], own
    assert saturated["journaled"] >= saturated["answered"] > 0, own
    assert half["journaled"] >= half["answered"] == half["requests"] > 0, own
    conn = results["connections"]
    assert conn["opened"] == conn["wanted"] == conn["alive_at_end"] == 20
    assert conn["failures"] == {}

    rows = {row["key"]: row for row in results["derived"]["table"]}
    assert set(rows) == TABLE_KEYS
    quiet = results["registered"]["singles_half"]["quiet"]
    for key, row in rows.items():
        if key == "singles_half_quiet_p99_ms" and quiet["n"] == 0:
            # No request of a 1 s window came after a second of full speed: nothing to show.
            assert row["value"] is None, row
            continue
        assert _number(row["value"]), (key, row)
        if row["ceiling"] is not None:
            assert _number(row["ratio"]), (key, row)


def test_quick_lone_singles_report_a_cost_and_its_ceiling_per_rate(tmp_path: Path) -> None:
    out = tmp_path / "lone.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--scenarios", "lone",
         "--size", "lone_rates=200,1000", "--size", "lone_s=1", "--dir", str(tmp_path),
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| lone singles" in proc.stdout
    rows = json.loads(out.read_text())["lone"]["rates"]
    assert [row["rate"] for row in rows] == [200.0, 1000.0]
    for row in rows:
        assert row["answered"] > 0
        for key in ("per_s", "p50_ms", "p99_ms", "server_cpu_us_per_single", "ratio"):
            assert _number(row[key]), (key, row)
        assert row["tls_echo"]["requests"] > 0
        assert _number(row["tls_echo"]["server_cpu_us_per_request"]), row
