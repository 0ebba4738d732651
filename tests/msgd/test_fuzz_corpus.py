"""The kept fuzz corpus (fuzz/corpus/<target>) and the seeds run clean through their targets,
and the connection target's checks catch an adapter that breaks its promises.

Replaying is what keeps a found bug found: every input a campaign kept (`--minimise`) is run
here on every test run, without atheris (docs/fuzzing.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from msgd.registry.port import SUCCESS, Change, Decided
from msgd.server import fuzz
from msgd.server.answers import AnswerQueue
from tests.vectors import VECTORS
from wire.fuzz import CORPUS, FuzzFailure, corpus_inputs, replay

SUITE = fuzz.SUITE
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", sorted(SUITE.targets))
def test_kept_corpus_replays_clean(target: str) -> None:
    kept = [name for name, _ in corpus_inputs(SUITE, target, VECTORS)
            if not name.startswith("seed-")]
    assert kept, f"nothing kept in {CORPUS / target}"
    assert replay(SUITE, [target], VECTORS) >= len(kept)


def test_kept_corpus_is_small() -> None:
    sizes = [p.stat().st_size for p in CORPUS.rglob("*") if p.is_file()]
    assert 0 < sum(sizes) < 4 * 1024 * 1024


class _Liar:
    """A registrar that answers success at once and tells no one (not the harness's)."""

    def submit(self, gateway: str, changes: Sequence[Change], decided: Decided) -> None:
        decided([SUCCESS] * len(changes))

    def settle_completed(self) -> None:
        pass


def test_an_answer_the_registrar_did_not_give_is_caught() -> None:
    harness = fuzz.Harness(fuzz.seeds()["register"])
    harness.host.registrar = _Liar()  # type: ignore[assignment]
    with pytest.raises(FuzzFailure, match="before the registrar decided"):
        harness.run()


def test_a_read_decides_what_the_registrar_finished_before_the_loop_turns() -> None:
    # In msgd the writer's completion waits in the loop's queue behind the other connections'
    # reads of the turn; the first read decides it (data_received -> settle_completed) and
    # its answer goes out then, not when the loop reaches the queued callback.
    op = {f.__name__[3:]: n for n, f in reversed(list(enumerate(fuzz.Harness.OPS)))}
    hello = bytes([op["frame"], 0, 0, 2, op["read"], 0xFF])
    # Octet 1: a window of 4096, so reading goes on while the first request is unanswered.
    program = (b"\x00\x30" + hello + bytes([op["frame"], 1, 1, 4, op["read"], 0xFF])
               + bytes([op["frame"], 1, 2, 4]))  # a second request, not read yet
    harness = fuzz.Harness(program)
    while harness.pos < len(program):
        harness.OPS[harness.byte() % len(harness.OPS)](harness)
        harness.loop.run_ready()
    assert len(harness.registrar.pending) == 1 and not harness.output.answered
    harness.registrar.complete(0)  # decided by a callback the loop has not run yet
    assert harness.loop.ready and not harness.output.answered
    harness.op_read()
    assert sum(harness.output.answered.values()) == 1


def test_an_answer_sent_twice_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    send_ready = AnswerQueue.send_ready

    def twice(self: AnswerQueue, session: Any, count: Any) -> None:
        before = len(session._out)
        send_ready(self, session, count)
        session._out.extend(session._out[before:])  # every answer of this call, once more

    monkeypatch.setattr(AnswerQueue, "send_ready", twice)
    with pytest.raises(FuzzFailure, match="no such request"):
        fuzz.run_connection(fuzz.seeds()["register"])


def test_connection_target_runs_under_atheris(tmp_path: Path) -> None:
    """`python -m msgd.server.fuzz --target connection` fuzzes with coverage feedback and
    finds nothing in a few seconds (the campaigns: docs/survival.md, Fuzzing)."""
    process = subprocess.run(
        [sys.executable, "-m", "msgd.server.fuzz", "--target", "connection", "--seconds", "2",
         "-print_final_stats=1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=120)
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    inited = re.search(r"INITED cov: (\d+)", output)
    assert inited and int(inited.group(1)) > 500, output[:2000]
    runs = re.search(r"Done (\d+) runs", output)
    assert runs and int(runs.group(1)) > 20, output[-2000:]
    assert not list((tmp_path / "fuzz-out").glob("crash-*"))
