"""The crash campaign's short version: `python -m bench.crash --small` for a few rounds.

bench/crash.py kills a real msgd with SIGKILL at random instants during bulk registration,
bulk de-registration, singles from several gateways, online compaction and reload, and checks
every acknowledged change against the file the kill left (and integrity_check, and the
restart). The full campaign (100 000 UEs, bulks of 15 000, 100 rounds) is run by hand;
MSGD_CRASH_ROUNDS sets the rounds here (default 3: a compaction, a reload, singles).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.hostile.tools import record

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = int(os.environ.get("MSGD_CRASH_ROUNDS", "3"))


def test_crash_campaign_loses_nothing_acknowledged(tmp_path: Path) -> None:
    out = tmp_path / "crash.json"
    seed = os.environ.get("HOSTILE_SEED", "20261206")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.crash", "--rounds", str(ROUNDS), "--small",
         "--focus", "compaction", "reload", "singles", "--seed", seed,
         "--dir", str(tmp_path), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["rounds"] == ROUNDS, proc.stderr[-4000:]
    assert (summary["lost"], summary["invented"]) == (0, 0), report["rounds"]
    assert summary["integrity_ok"] == ROUNDS
    assert summary["acknowledged"] > 0 and summary["unanswered"] > 0
    assert proc.returncode == 0, proc.stderr[-4000:]
    for round_ in report["rounds"]:
        assert round_["integrity_check"] == "ok"
        assert 0 < round_["restart_ready_s"] < 60
    record("crash campaign (short)", rounds=ROUNDS, seed=int(seed),
           acknowledged=summary["acknowledged"], lost=summary["lost"],
           unanswered=summary["unanswered"], in_compaction=summary["kills_in_compaction"],
           in_reload=summary["kills_in_reload"],
           slowest_restart_s=summary["restart_ready_s"]["max"])
