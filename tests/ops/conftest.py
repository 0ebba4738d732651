"""Fixtures of the operations tests: a PKI, short socket paths, a stand-in systemd manager."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"),
                    gateways=("gw1.example", "gw2.example", "gw3.example"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 107 octets; tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="msgd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Manager:
    """systemd's side of sd_notify: a real AF_UNIX datagram socket.

    A thread receives datagrams as they arrive and timestamps them (time.monotonic()), so gaps
    between WATCHDOG=1 pings are measured as systemd would see them, however late the test
    looks at them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self.cursor = 0  # messages before this index were consumed by wait_for
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="notify-manager", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cv:
                self.messages.append((time.monotonic(), data.decode("utf-8").split("\n")))
                self._cv.notify_all()

    def wait_for(self, assignment: str, timeout: float = 30.0) -> tuple[float, list[str]]:
        """The next message (after those consumed) holding `assignment`, e.g. "READY=1"."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for index in range(self.cursor, len(self.messages)):
                    if assignment in self.messages[index][1]:
                        self.cursor = index + 1
                        return self.messages[index]
                self.cursor = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {assignment} within {timeout} s; last: {self.messages[-5:]}")
                self._cv.wait(left)

    async def await_for(self, assignment: str, timeout: float = 30.0) -> tuple[float, list[str]]:
        return await asyncio.to_thread(self.wait_for, assignment, timeout)

    def ping_after(self, since: float, timeout: float) -> float:
        """When the first WATCHDOG=1 after monotonic time `since` arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                later = [when for when, lines in self.messages
                         if when > since and "WATCHDOG=1" in lines]
                if later:
                    return later[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no WATCHDOG=1 within {timeout} s")
                self._cv.wait(left)

    async def await_ping_after(self, since: float, timeout: float) -> float:
        return await asyncio.to_thread(self.ping_after, since, timeout)

    def pings(self) -> list[float]:
        with self._cv:
            return [when for when, lines in self.messages if "WATCHDOG=1" in lines]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def manager(sock_dir: Path) -> Iterator[Manager]:
    m = Manager(sock_dir / "notify")
    yield m
    m.close()
