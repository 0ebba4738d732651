"""The floors under a lone single (bench/tls_echo_floor.py): a ceiling is only worth its
comparison if it does the work it claims, so the durable floor must verify each proof and
journal each change it answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import uvloop

from bench import tls_echo_floor
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_the_durable_floor_journals_every_request_it_answers(pki: Pki, tmp_path: Path) -> None:
    database = tmp_path / "floor.sqlite"
    result = tls_echo_floor.measure(400, 4, 1.0, pki.server_cert, pki.server_key, database)
    assert result["requests"] > 0
    assert result["answered"] == result["requests"]
    assert result["refused"] == 0
    assert result["journaled"] == result["requests"]


def test_the_durable_floor_refuses_a_wrong_proof_and_journals_nothing(
        pki: Pki, tmp_path: Path) -> None:
    database = tmp_path / "floor.sqlite"
    record = bytearray(tls_echo_floor.floor_record(7))
    record[40] ^= 1  # inside the proof
    with tls_echo_floor.serving(pki.server_cert, pki.server_key, database) as (_server, port):
        sent, latencies, refused = uvloop.run(
            tls_echo_floor._drive(port, 200, 2, 0.5, [bytes(record)]))
    assert sent > 0
    assert len(latencies) == refused == sent
    assert tls_echo_floor.journaled(database) == 0


def test_the_echo_answers_every_request(pki: Pki) -> None:
    result = tls_echo_floor.measure(400, 4, 1.0, pki.server_cert, pki.server_key)
    assert result["requests"] > 0
    assert result["answered"] == result["requests"]
    assert "journaled" not in result


def test_extra_work_per_request_costs_the_floor_at_least_that_cpu(
        pki: Pki, tmp_path: Path) -> None:
    # Calibrated at the fastest of its tries, the work cannot take less CPU later; without
    # it a request here costs the floor a few hundred µs (mostly the loop's wake-ups).
    result = tls_echo_floor.measure(100, 2, 1.0, pki.server_cert, pki.server_key,
                                    tmp_path / "floor.sqlite", extra_us=2000)
    assert result["journaled"] == result["requests"] > 0
    assert result["server_cpu_us_per_request"] >= 2000, result
