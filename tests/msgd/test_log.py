"""msgd.log: logfmt lines, journald detection, context binding and the secret sanitiser."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgd.log import (
    EventLogger,
    bind,
    format_value,
    get_logger,
    is_sensitive,
    sanitize,
    setup_logging,
    under_journald,
)

TS = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def capture(level: str = "debug", *, journald: bool = False) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, stream, journald=journald)
    return stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_event_line_with_timestamp() -> None:
    stream = capture()
    get_logger("msgd.test").info("gateway.connected", gateway="gw1.example", peer="127.0.0.1:5555")
    (line,) = lines(stream)
    assert re.fullmatch(
        TS + r" level=info event=gateway\.connected gateway=gw1\.example peer=127\.0\.0\.1:5555",
        line,
    ), line


def test_journald_lines_have_priority_and_no_timestamp() -> None:
    stream = capture(journald=True)
    log = get_logger("msgd.test")
    log.info("registry.opened", path="/var/lib/msgd/registry.sqlite")
    log.warning("gateway.refused", gateway="gw9")
    log.error("registry.write_failed")
    log.debug("frame.received", size=12)
    assert lines(stream) == [
        "<6>level=info event=registry.opened path=/var/lib/msgd/registry.sqlite",
        "<4>level=warning event=gateway.refused gateway=gw9",
        "<3>level=error event=registry.write_failed",
        "<7>level=debug event=frame.received size=12",
    ]


def test_journald_detected_from_journal_stream(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(journal, env) is True
        # Inherited by something whose stderr went elsewhere: not the journal.
        assert under_journald(other, env) is False
        assert under_journald(journal, {}) is False
        assert under_journald(journal, {"JOURNAL_STREAM": "garbage"}) is False
        assert under_journald(io.StringIO(), env) is False

        setup_logging("info", journal, environ=env)
        get_logger("msgd.test").info("started")
        setup_logging("info", other, environ=env)
        get_logger("msgd.test").info("started")
    assert (tmp_path / "journal").read_text() == "<6>level=info event=started\n"
    assert re.fullmatch(TS + r" level=info event=started\n", (tmp_path / "other").read_text())


def test_values_are_quoted_and_stay_on_one_line() -> None:
    stream = capture()
    get_logger("msgd.test").info(
        "gateway.goodbye",
        diagnostic='bye now "friend"',
        forged="x\nlevel=error event=forged",
        empty="",
        back="a\\b",
        sep="a\u2028b",
        ok=True,
        none=None,
        n=3,
    )
    (line,) = lines(stream)
    assert line.endswith(
        ' level=info event=gateway.goodbye diagnostic="bye now \\"friend\\""'
        ' forged="x\\nlevel=error event=forged" empty="" back="a\\\\b" sep="a\\u2028b"'
        " ok=true none=null n=3"
    ), line


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        ("with space", '"with space"'),
        ("a=b", '"a=b"'),
        ("tab\there", '"tab\\there"'),
        ("\x1b[31m", '"\\u001b[31m"'),
        ("ünïcode", "ünïcode"),
        (1.5, "1.5"),
        (False, "false"),
    ],
)
def test_format_value(value: object, text: str) -> None:
    assert format_value(value) == text


def test_secrets_are_masked_whatever_the_name_or_type() -> None:
    stream = capture()
    key = bytes(range(32))
    get_logger("msgd.test").info(
        "ue.registration",
        ue="ue-0001@gw1.example",
        key="00112233445566778899aabbccddeeff",
        credential="c0ffee",
        nonce="n0nce",
        proof="pr00f",
        private_key="-----BEGIN PRIVATE KEY-----",
        k_ue="kue",
        ue_key="uekey",
        data=key,
        listed=[b"\x01\x02", "fine"],
        nested={"server_nonce": "nn", "x": b"\x03"},
    )
    (line,) = lines(stream)
    for secret in ("00112233", "c0ffee", "n0nce", "pr00f", "BEGIN", "kue", "uekey", "nn"):
        assert secret not in line
    assert key.hex() not in line and repr(key) not in line and "\\x01" not in line
    assert "ue=ue-0001@gw1.example" in line
    for name in ("key", "credential", "nonce", "proof", "private_key", "k_ue", "ue_key"):
        assert f" {name}=<redacted>" in line
    assert " data=<bytes>" in line
    assert "fine" in line


def test_bytes_in_format_arguments_are_masked() -> None:
    stream = capture()
    logging.getLogger("msgd.test").info("proof was %s for %s", b"\xde\xad\xbe\xef", "ue-1")
    (line,) = lines(stream)
    assert "\\xde" not in line and "dead" not in line
    assert 'msg="proof was <bytes> for ue-1"' in line


def test_sanitize_and_is_sensitive() -> None:
    assert sanitize({"key": "k", "peer": "p", "blob": b"x"}) == {
        "key": "<redacted>",
        "peer": "p",
        "blob": "<bytes>",
    }
    assert is_sensitive("Private_Key") and is_sensitive("ue_credential") and is_sensitive("nonce")
    assert not is_sensitive("keepalive_interval") and not is_sensitive("gateway")


def test_bound_context_is_per_connection() -> None:
    stream = capture()
    base = get_logger("msgd.connection")
    conn = base.bind(gateway="gw1.example", peer="127.0.0.1:5555")
    txn = conn.bind(tid=7)
    txn.info("ue.registered", ue="ue-0001@gw1.example")
    conn.info("connection.closed")
    base.info("listener.ready")
    assert [line.split(" ", 1)[1] for line in lines(stream)] == [
        "level=info event=ue.registered gateway=gw1.example peer=127.0.0.1:5555 tid=7 "
        "ue=ue-0001@gw1.example",
        "level=info event=connection.closed gateway=gw1.example peer=127.0.0.1:5555",
        "level=info event=listener.ready",
    ]
    assert conn.context == {"gateway": "gw1.example", "peer": "127.0.0.1:5555"}


def test_bind_wraps_a_plain_logger_and_masks_context() -> None:
    stream = capture()
    log = bind(logging.getLogger("msgd.test"), gateway="gw1", nonce=b"\x00" * 32)
    assert isinstance(log, EventLogger)
    log.info("hello.sent")
    (line,) = lines(stream)
    assert line.endswith("level=info event=hello.sent gateway=gw1 nonce=<redacted>")


def test_level_filter_and_reconfiguration() -> None:
    first = capture("warning")
    log = get_logger("msgd.test")
    log.info("hidden")
    log.warning("shown")
    second = capture("info")  # a reload: the old handler goes, the new level applies
    log.info("after.reload")
    assert [line.split(" ", 1)[1] for line in lines(first)] == ["level=warning event=shown"]
    assert [line.split(" ", 1)[1] for line in lines(second)] == ["level=info event=after.reload"]


def test_exception_stays_on_one_line() -> None:
    stream = capture()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        get_logger("msgd.test").exception("loop.crashed", gateway="gw1")
    (line,) = lines(stream)
    assert 'exc="ValueError: bad\\nthing"' in line
    assert 'traceback="Traceback (most recent call last):\\n' in line


def test_foreign_logger_message_is_msg_with_logger_name() -> None:
    stream = capture()
    logging.getLogger("asyncio").warning("Task was destroyed but it is pending!")
    (line,) = lines(stream)
    assert line.endswith(
        'level=warning msg="Task was destroyed but it is pending!" logger=asyncio'
    ), line


def test_unknown_level_is_an_error() -> None:
    with pytest.raises(ValueError, match="verbose"):
        setup_logging("verbose", io.StringIO())
