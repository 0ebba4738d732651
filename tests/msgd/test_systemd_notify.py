"""msgd.systemd: sd_notify datagrams received on a real AF_UNIX socket, and the watchdog period."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgd.ops.systemd import Notifier, watchdog_interval

TIMEOUT = 10.0


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A stand-in for systemd's notification socket, bound in tmp_path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(TIMEOUT)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode("utf-8").split("\n")


def test_messages_arrive_as_datagrams(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("listening on 127.0.0.1:7554")
    assert receive(sock) == ["READY=1", "STATUS=listening on 127.0.0.1:7554"]
    assert notifier.stopping()
    assert receive(sock) == ["STOPPING=1"]
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]
    assert notifier.status("3 gateways\nconnected")
    # A newline would start a new assignment; STATUS stays one line.
    assert receive(sock) == ["STATUS=3 gateways connected"]
    notifier.close()


def test_reloading_carries_monotonic_usec(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    notifier = Notifier(path)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading configuration")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receive(sock)
    assert lines[0] == "RELOADING=1"
    name, _, value = lines[1].partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2:] == ["STATUS=reloading configuration"]
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"msgd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(TIMEOUT)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert receive(sock) == ["READY=1"]
        notifier.close()


def test_reads_the_process_environment(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = manager
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier.from_env()
    assert notifier.ready()
    assert receive(sock) == ["READY=1"]
    notifier.close()


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier in (Notifier.from_env(), Notifier.from_env({}), Notifier(None)):
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.reloading() is False
        assert notifier.stopping() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False
        notifier.close()


def test_unsupported_address_is_a_no_op() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level(logging.DEBUG, logger="msgd.systemd"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if r.name == "msgd.systemd"]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)
    assert "READY=1" in failures[0].getMessage()
    notifier.close()


def test_manager_going_away_later_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(TIMEOUT)
    notifier = Notifier(str(path))
    assert notifier.ready()
    assert receive(sock) == ["READY=1"]
    sock.close()
    path.unlink()
    assert notifier.watchdog() is False
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
    ids=["set", "our-pid", "other-pid", "bad-pid", "zero", "negative", "garbage", "empty", "unset"],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    assert Notifier(None).watchdog_interval() == 2.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
    # from_env(mapping) reads the watchdog from the same mapping, not the process environment.
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000"}).watchdog_interval() == 4.0
