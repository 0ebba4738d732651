"""Small SQLite helpers shared by the registry's modules: error text, read-only connections,
a rollback that never raises."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

__all__ = ["describe", "one_line", "readonly", "rollback_quietly"]

log = logging.getLogger("msgd.registry")


def one_line(text: object) -> str:
    """`text` on one line: messages and log lines about the file never span lines."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"


def readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the registry file (one that cannot checkpoint the WAL)."""
    return sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)


def rollback_quietly(conn: sqlite3.Connection, path: Path) -> None:
    """Roll back the open transaction, if any; a failure is logged, since the caller is
    already handling the error that made it roll back."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("registry %s: rollback failed", path, exc_info=True)
