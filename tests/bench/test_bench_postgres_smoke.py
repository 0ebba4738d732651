"""`python -m bench --registry postgresql --quick` must run and report every number (speed is
measured in bench/, never asserted here). It needs Debian's postgresql server, as the
PostgreSQL tests do: without it the run fails, naming the package."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _logs(run_dir: Path) -> str:
    """The nodes' and load generators' logs, for a failure's message."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(run_dir.glob("**/*.log")))


def test_quick_postgresql_benchmark_reports_every_number(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    (tmp_path / "run").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--registry", "postgresql", "--quick",
         "--dir", str(tmp_path / "run"), "--keep", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| bulk registration, one node |" in proc.stdout
    pg = json.loads(out.read_text())["postgresql_registry"]
    assert _number(pg["ceiling"]["rows_per_s"])
    n = json.loads(out.read_text())["sizes"]["bulk_n"]
    for name in ("one_node_register", "one_node_deregister", "two_nodes_register",
                 "two_nodes_deregister"):
        result = pg[name]
        # Every UE answered SUCCESS: a benchmark of failures would measure nothing.
        assert (result["n"], result["ok"], result["failed"]) == (n, n, 0), (
            name, result, _logs(tmp_path / "run"))
        # What the answers claim is what the database holds.
        assert result["rows_after"] == (n if name.endswith("_register") else 0), (name, result)
        assert _number(result["ue_per_s"]) and _number(result["server_cpu_us_per_ue"])
    # Where the host's CPU went, per phase: PostgreSQL's and the other side's share.
    assert pg["ceiling"]["cpu"]["postgresql_us_per_ue"] > 0
    assert pg["ceiling"]["cpu"]["client_us_per_ue"] > 0
    for name in ("one_node_register", "one_node_deregister", "two_nodes_register",
                 "two_nodes_deregister", "singles"):
        cpu = pg[name]["cpu"]
        assert cpu["postgresql_us_per_ue"] > 0 and cpu["nodes_us_per_ue"] > 0, (name, cpu)
        assert cpu["loadgen_us_per_ue"] > 0 and _number(cpu["host_busy_cores"]), (name, cpu)
    assert "| bulk registration, one node | " in proc.stdout.split("Where the host's CPU")[1]
    singles = pg["singles"]
    assert singles["ok"] > 0 and singles["ok"] == singles["answered"], singles
    assert _number(singles["p99_ms"])
    for node in ("pg-node-1_stop", "pg-node-2_stop"):
        assert pg[node]["exit_code"] == 0


def test_pg_rows_reports_each_variant_against_its_ceiling() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pg_rows", "--rows", "4000", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["variant"] for r in results] == ["ceiling", "bare", "table", "decide"]
    for result in results:
        assert result["rows"] == 4000 and result["backend_us_per_row"] > 0, result
        assert _number(result["ratio_to_ceiling"]) and _number(result["rows_per_s"])
    assert results[0]["ratio_to_ceiling"] == 1.0
