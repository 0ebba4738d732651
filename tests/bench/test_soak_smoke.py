"""The soak's short version: `python -m bench --scenarios soak` with tiny sizes and thresholds.

The real soak (bench/soak.py: 1,000,000 UEs, 30 minutes) is run by hand; this keeps it from
rotting and checks what the soak relies on: every change of the churn answered with success,
compactions running under it, the journal kept short by them, and msgd after kill -9 holding
exactly the registrations the answers left.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_KEYS = ("rss_bytes", "file_bytes", "journal_rows", "journal_changes", "compactions",
               "commit_p99_ms", "loop_lag_p99_ms")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_short_soak_reports_every_sample(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    sizes = {"soak_n": 3000, "soak_gateways": 3, "soak_s": 4, "soak_sample_s": 1,
             "soak_calibrate_s": 1, "soak_bulk": 100, "soak_compact_changes": 1000,
             "soak_compact_ratio": 0, "soak_compact_interval": 0}
    argv = [sys.executable, "-m", "bench", "--scenarios", "soak", "--dir", str(tmp_path),
            "--json", str(out)]
    for name, value in sizes.items():
        argv += ["--size", f"{name}={value}"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| min | RSS MB |" in proc.stdout
    soak = json.loads(out.read_text())["soak"]

    assert soak["registered"] == soak["n"] == 3000
    samples = soak["samples"]
    assert len(samples) >= 3
    for sample in samples:
        for key in SAMPLE_KEYS:
            assert _number(sample[key]), (key, sample)
    churn = soak["churn"]
    assert churn["changes"] > 1000 and churn["failures"] == {} and churn["errors"] == {}
    assert churn["unanswered_at_end"] == 0
    # Compactions ran under the churn and kept the journal near its threshold; without them
    # it would hold every change of the run.
    assert samples[-1]["compactions"] >= 1 and samples[-1]["compactions_failed"] == 0
    assert max(s["journal_changes"] for s in samples) < churn["changes"] / 2
    # What the answers left registered is what msgd holds after kill -9.
    assert soak["verdict"]["nothing_lost"] is True
    assert soak["registered_after_kill"] == churn["registered"] == 3000
    assert _number(soak["ready_after_kill_s"]) and _number(soak["ready_after_stop_s"])
    for key in ("rss_bytes", "file_bytes"):
        assert _number(soak["verdict"][key]["max_ratio"])
