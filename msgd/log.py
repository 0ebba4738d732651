"""Logging for msgd: one logfmt line per event, with secrets kept out.

    level=info event=gateway.connected gateway=gw1.example peer=127.0.0.1:5555

Code logs an event name plus fields through an EventLogger (get_logger / .bind for per
connection context such as gateway, peer, tid). Under journald (JOURNAL_STREAM names our
stderr) lines carry a "<N>" syslog priority prefix and no timestamp, since the journal adds
both; elsewhere they start with ts=. The sanitiser masks any field named like a secret (key,
credential, nonce, proof, private_key, ...) and every bytes value, whatever its name: K_ue,
UE credentials and server nonces must never reach a log (wire-v1 §6).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

__all__ = [
    "EventLogger",
    "LogfmtFormatter",
    "bind",
    "format_value",
    "get_logger",
    "is_sensitive",
    "sanitize",
    "setup_logging",
    "under_journald",
]

REDACTED = "<redacted>"
BYTES_MASK = "<bytes>"
# Field names whose values are secret whatever their type (wire-v1 §6: K_ue, proof, nonce).
SENSITIVE_NAMES = frozenset(
    {
        "key",
        "k_ue",
        "credential",
        "nonce",
        "proof",
        "private_key",
        "password",
        "secret",
        "token",
    }
)
SENSITIVE_SUFFIXES = ("_key", "_credential", "_nonce", "_proof", "_secret", "_password")
_EVENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]*")
_FIELD_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_FIELDS_ATTR = "msgd_fields"
_HANDLER_MARK = "_msgd_handler"
# syslog priorities for journald's SyslogLevelPrefix= ("<3>" = err ...), see sd-daemon(3).
_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def is_sensitive(name: str) -> bool:
    lowered = name.lower()
    return lowered in SENSITIVE_NAMES or lowered.endswith(SENSITIVE_SUFFIXES)


def sanitize(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return `fields` with secret-named fields and all bytes values masked."""
    return {
        name: REDACTED if is_sensitive(str(name)) else _clean(value)
        for name, value in fields.items()
    }


def _clean(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES_MASK
    if isinstance(value, Mapping):
        return sanitize(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(item) for item in value]
    return value


def format_value(value: Any) -> str:
    """Render one logfmt value, quoted when it holds spaces, '=', quotes or unprintables."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and text.isprintable() and not any(ch in text for ch in ' ="\\'):
        return text
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable() and ch != " ":
            # Control and line-separator characters would split or forge log lines.
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class LogfmtFormatter(logging.Formatter):
    """Formats a record as one logfmt line: [ts=] level= event=|msg= fields... [exc=]."""

    def __init__(self, *, timestamps: bool = True, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        parts: list[str] = []
        if self.timestamps:
            when = dt.datetime.fromtimestamp(record.created, dt.UTC)
            parts.append(f"ts={when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        message = _message(record)
        if _EVENT_NAME.fullmatch(message):
            parts.append(f"event={message}")
        else:
            parts.append(f"msg={format_value(message)}")
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields:
            for name, value in sanitize(fields).items():
                parts.append(f"{_FIELD_NAME_BAD.sub('_', str(name)) or '_'}={format_value(value)}")
        if not record.name.startswith("msgd") and record.name != "root":
            parts.append(f"logger={format_value(record.name)}")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append(f"exc={format_value(f'{type(exc).__name__}: {exc}')}")
            parts.append(f"traceback={format_value(self.formatException(record.exc_info))}")
        if record.stack_info:
            parts.append(f"stack={format_value(record.stack_info)}")
        line = " ".join(parts)
        if self.syslog_prefix:
            line = f"<{_priority(record.levelno)}>{line}"
        return line


class EventLogger(logging.LoggerAdapter):
    """A logger taking an event name and keyword fields, with bound context fields.

        log = get_logger(__name__).bind(gateway="gw1.example", peer="127.0.0.1:5555")
        log.info("ue.registered", ue="ue-0001@gw1.example", tid=7)

    Field names `msg` and `level` are taken by the logging API; don't use them.
    """

    def __init__(self, logger: logging.Logger, context: Mapping[str, Any] | None = None) -> None:
        super().__init__(logger, dict(context or {}))

    @property
    def context(self) -> dict[str, Any]:
        return dict(self.extra or {})

    def bind(self, **fields: Any) -> EventLogger:
        """A new EventLogger with these fields added to every line."""
        return EventLogger(self.logger, {**(self.extra or {}), **fields})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        standard = {
            name: kwargs.pop(name)
            for name in ("exc_info", "stack_info", "stacklevel", "extra")
            if name in kwargs
        }
        extra = dict(standard.get("extra") or {})
        extra[_FIELDS_ATTR] = {**(self.extra or {}), **kwargs}
        standard["extra"] = extra
        return msg, standard


def get_logger(name: str, **context: Any) -> EventLogger:
    return EventLogger(logging.getLogger(name), context)


def bind(logger: logging.Logger | EventLogger, **fields: Any) -> EventLogger:
    """Attach context fields (gateway, peer, tid ...) to a plain logger or an EventLogger."""
    if isinstance(logger, EventLogger):
        return logger.bind(**fields)
    return EventLogger(logger, fields)


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal stream systemd handed us (JOURNAL_STREAM=dev:ino).

    Comparing device and inode, as systemd.exec(5) advises, tells a stream inherited by a
    redirected child from the real one. A stream without a file descriptor is not the journal.
    """
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev_text), int(ino_text))
    except (OSError, ValueError, AttributeError):
        return False


def setup_logging(
    level: str | int = "info",
    stream: TextIO | None = None,
    *,
    journald: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send all logging to `stream` (stderr by default) as logfmt at `level`.

    journald None means detect it from JOURNAL_STREAM. Calling again replaces the handler
    installed before (a reload may change the level), leaving other handlers alone.
    """
    stream = sys.stderr if stream is None else stream
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}")
        level = resolved
    if journald is None:
        journald = under_journald(stream, environ)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter(timestamps=not journald, syslog_prefix=journald))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _message(record: logging.LogRecord) -> str:
    # Like record.getMessage(), but bytes arguments are masked before %-formatting.
    msg = str(record.msg)
    args = record.args
    if not args:
        return msg
    if isinstance(args, Mapping):
        args = {name: _arg(name, value) for name, value in args.items()}
    else:
        args = tuple(_clean(arg) for arg in args)
    try:
        return msg % args
    except (TypeError, ValueError, KeyError):
        return f"{msg} {args!r}"


def _arg(name: str, value: Any) -> Any:
    return REDACTED if is_sensitive(str(name)) else _clean(value)


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITY:
        if levelno >= threshold:
            return priority
    return 7
