"""sd_notify(3) without libsystemd: readiness, reload, stop, status and watchdog messages.

systemd (Type=notify, NotifyAccess=main) gives the daemon NOTIFY_SOCKET, an AF_UNIX datagram
socket named by a path or, with a leading '@', in the abstract namespace. Each notification is
one datagram of newline-separated VAR=value assignments. Without NOTIFY_SOCKET (run by hand,
in tests) every call is a no-op. A failed send never raises: the service must not die because
the manager is momentarily unreachable; it is logged at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

_log = logging.getLogger("msgd.systemd")  # a stable name for log filters


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period in seconds from WATCHDOG_USEC, or None when not enabled for us.

    WATCHDOG_PID, when set, names the process meant to ping; if that is not this process (the
    variable was inherited), the watchdog is not ours. The daemon pings at half the period,
    as sd_watchdog_enabled(3) advises.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """Sends sd_notify datagrams to the service manager; does nothing without an address."""

    def __init__(self, address: str | None, environ: Mapping[str, str] | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._socket: socket.socket | None = None
        # Where watchdog_interval() looks: the mapping given to from_env, else os.environ.
        self._environ = environ

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None, environ)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of "VAR=value" lines; True when the manager got it."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            _log.debug("sd_notify %s failed: %s", assignments[0], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: send once the listener is bound and the registry is open."""
        return self.notify("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, which systemd >= 253 uses to match the reload."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.notify(*self._status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        return watchdog_interval(self._environ)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        # One assignment per line: a newline inside STATUS would start a bogus assignment.
        return ("STATUS=" + " ".join(text.splitlines()),)


def _socket_address(address: str) -> str | None:
    if address.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL octet.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # Other forms (vsock:..., newer systemd) are not supported; behave as if unset.
    _log.debug("NOTIFY_SOCKET %r is not a unix socket address; notifications disabled", address)
    return None
