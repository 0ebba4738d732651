"""The suite-wide log scan for secrets (tests/ops/secret_scan.py) can find what it looks for.

The scan itself runs at the end of every session (tests/conftest.py pytest_sessionfinish) and
fails the run on a finding; these tests plant leaks to show it would.
"""

from __future__ import annotations

import base64
import logging
import secrets

from msgd.log import get_logger
from tests.ops import secret_scan
from tests.ops.secret_scan import Prefixes, scan_text
from wire.credential import compute_proof

LINE = ("ts=2026-01-01T00:00:00.000Z level=info event=gateway.hello peer=127.0.0.1:40000 "
        "gateway=gw1.example serial=381fde3ce15302b98f82dc51e5020b3ff5535498 "
        "path=/tmp/pytest-of-root/pytest-1/test_x0/d/registry.sqlite")


def test_finds_a_secret_in_every_form_it_could_take():
    key = secrets.token_bytes(32)
    table = Prefixes.of([key])
    leaks = {
        "hex": f"key={key.hex()}",
        "upper hex": f"K={key.hex().upper()}",
        "truncated hex inside a longer run": f"x=ff{key.hex()[:16]}00",
        "base64": f"k={base64.b64encode(key).decode()}",
        "urlsafe base64 without padding": base64.urlsafe_b64encode(key).decode().rstrip("="),
        "base64 mid-token": "blob=" + base64.b64encode(b"abc" + key).decode(),
        "bytes literal": f"value={key!r}",
        "bytes literal, logfmt-escaped": f'detail="{key!r}"'.replace("\\", "\\\\"),
    }
    for name, text in leaks.items():
        assert scan_text(LINE + "\n" + text, table) == [(2, scan_text(text, table)[0][1])], name
    assert scan_text("-----BEGIN PRIVATE KEY-----", table) == [(1, "a PEM private key")]


def test_no_finding_in_an_ordinary_log_line():
    table = Prefixes.of([secrets.token_bytes(32) for _ in range(1000)])
    assert scan_text(LINE, table) == []
    # Low-entropy test keys (b"\x05" * 32) are not tracked: they would match "0505..." text.
    assert len(Prefixes.of([b"\x05" * 32, bytes(32)])) == 0


def test_proofs_keys_and_nonces_are_recorded_where_they_are_computed():
    key, nonce = secrets.token_bytes(32), secrets.token_bytes(32)
    proof = compute_proof(key, nonce, 1, "ue@example")
    assert secret_scan.is_recorded(proof)
    assert secret_scan.is_recorded(key) and secret_scan.is_recorded(nonce)


def test_in_process_logs_reach_the_session_log():
    marker = secrets.token_hex(8)
    get_logger("msgd.test").info("scan.probe", marker=marker)
    path = secret_scan._state["path"]
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert f"event=scan.probe marker={marker}" in path.read_text()
