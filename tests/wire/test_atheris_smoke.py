"""Each atheris target of wire.fuzz runs for a few seconds and finds nothing (docs/fuzzing.md).

The four runs go in parallel subprocesses (libFuzzer owns its process), each in its own
temporary directory, so no corpus or artifact lands in the checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.vectors import vectors_path
from wire.fuzz import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 4


def test_every_target_runs_clean(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {}
    for target in TARGETS:
        cwd = tmp_path / target
        cwd.mkdir()
        runs[target] = subprocess.Popen(
            [sys.executable, "-m", "wire.fuzz", "--target", target, "--seconds", str(SECONDS),
             "--vectors", str(vectors_path()), "-print_final_stats=1"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report = {}
    for target, process in runs.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{target}:\n{output[-4000:]}"
        # Coverage feedback works (it did not when wire was imported before instrumenting).
        inited = re.search(r"INITED cov: (\d+)", output)
        assert inited and int(inited.group(1)) > 100, f"{target}: not instrumented\n{output[:2000]}"
        done = re.search(r"Done (\d+) runs in (\d+) second", output)
        assert done, f"{target}: no libFuzzer summary\n{output[-2000:]}"
        runs_done = int(done.group(1))
        assert runs_done > 20, f"{target}: only {runs_done} executions"
        seeds = list((tmp_path / target / "fuzz-out" / "corpus" / target).glob("seed-*"))
        assert len(seeds) >= 5, f"{target}: seed corpus not written"
        report[target] = runs_done / max(int(done.group(2)), 1)
        assert not list((tmp_path / target / "fuzz-out").glob("crash-*")), target
    print("executions per second:", {t: round(r) for t, r in report.items()})
