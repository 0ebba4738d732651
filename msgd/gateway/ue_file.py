"""The Message Gateway's UE configuration file (TS 23.554 clause 8.1.3), read lazily.

8.1.3 gives the gateway, per Non-MSGin5G UE it serves, a UE Service ID, credentials and
optionally a Non-MSGin5G UE profile; NOTE 1 of 8.1.1 lets the gateway be pre-configured
instead of using SEAL. This module reads that pre-configuration: a UTF-8 CSV file whose header
names its columns, in any order:

    column                      value                                           wire-v1 §3
    ue_service_id   (required)  the UE Service ID, 1-255 octets, no controls    IEI 0x01
    key                         K_ue, 64 hex digits; empty or absent for a      §6
                                gateway the server trusts (no UE credential)
    ue_type                     legacy_3gpp | non_3gpp (or 1 | 2)               0x30
    triggering_ue_identifier    MSISDN or external ID, 1-64 octets              0x31
    triggering_port             0-65535                                         0x32
    triggering_protocol         sms | nidd | ip (or 1 | 2 | 3)                  0x33
    communication_availability  PERIOD/WINDOW in seconds, e.g. 86400/600        0x34
    maximum_segment_size        octets, 0-4294967295                            0x35
    application_data            hex, at most 1024 octets                        0x36

An empty profile cell means "not sent"; a UE with no profile cell set is registered without
a profile. `msgctl demo init` writes the minimal form (`ue_service_id,key`). Blank lines are
skipped, a byte order mark is tolerated, a UE listed twice is registered twice. Errors name
the file and line ("gw1-ues.csv line 7: key must be 64 hex digits") and never quote a key.

read_ues() yields GatewayUe one line at a time (a file of millions of UEs, or standard input,
is never held in memory); scan_ues() checks a whole file first and counts it, so a tool can
refuse a bad file before it connects and show an ETA.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from msgd.errors import MsgdError
from msgd.gateway.values import GatewayUe
from wire.constants import (
    APPLICATION_DATA_MAX,
    TRIGGERING_UE_IDENTIFIER_MAX,
    TriggeringProtocol,
    UeType,
)
from wire.messages import Profile

__all__ = [
    "COLUMNS",
    "PROFILE_COLUMNS",
    "GatewayConfigError",
    "UeFileScan",
    "read_ues",
    "scan_ues",
    "write_ues",
]

PROFILE_COLUMNS = (
    "ue_type",
    "triggering_ue_identifier",
    "triggering_port",
    "triggering_protocol",
    "communication_availability",
    "maximum_segment_size",
    "application_data",
)
COLUMNS = ("ue_service_id", "key", *PROFILE_COLUMNS)
KEY_HEX = 64
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF

_UE_TYPES = {"legacy_3gpp": UeType.LEGACY_3GPP_UE, "non_3gpp": UeType.NON_3GPP_UE}
_PROTOCOLS = {p.name.lower(): p for p in TriggeringProtocol}


class GatewayConfigError(MsgdError):
    """The UE file cannot be used; the message names the file and line (never a key)."""


@dataclass(frozen=True)
class UeFileScan:
    """What scan_ues() found: how many UEs would be read, and which `only` IDs are absent."""

    count: int
    missing: tuple[str, ...] = ()


def read_ues(
    source: str | os.PathLike[str] | TextIO, *, only: Collection[str] | None = None
) -> Iterator[GatewayUe]:
    """Yield the file's UEs in order, checking each line as it is read.

    `source` is a path, "-" for standard input, or an open text file. With `only`, just the
    UEs whose UE Service ID is in it. The first bad line raises GatewayConfigError.
    """
    wanted = frozenset(only) if only is not None else None
    for _line, ue in _rows(source, wanted):
        yield ue


def scan_ues(
    path: str | os.PathLike[str], *, only: Collection[str] | None = None
) -> UeFileScan:
    """Check a whole file (constant memory, apart from `only`) and count what read_ues()
    would yield; GatewayConfigError for the first bad line."""
    wanted = frozenset(only) if only is not None else None
    found: set[str] = set()
    count = 0
    for _line, ue in _rows(path, wanted):
        count += 1
        if wanted is not None:
            found.add(ue.ue_service_id)
    missing = tuple(sorted(wanted - found)) if wanted is not None else ()
    return UeFileScan(count, missing)


def write_ues(target: str | os.PathLike[str] | TextIO, ues: Iterable[GatewayUe]) -> int:
    """Write UEs in this format (a path is written 0600: it holds keys); returns the count.

    The header has ue_service_id, key and every profile column, so one pass suffices."""
    if isinstance(target, (str, os.PathLike)):
        path = Path(target)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                count = write_ues(fh, ues)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return count
    writer = csv.writer(target, lineterminator="\n")
    writer.writerow(COLUMNS)
    count = 0
    for ue in ues:
        writer.writerow([ue.ue_service_id, ue.key.hex() if ue.key else "",
                         *_profile_cells(ue.profile)])
        count += 1
    return count


# --- reading ---------------------------------------------------------------------------------


def _rows(
    source: str | os.PathLike[str] | TextIO, wanted: frozenset[str] | None
) -> Iterator[tuple[int, GatewayUe]]:
    if isinstance(source, (str, os.PathLike)) and os.fspath(source) == "-":
        name = "<stdin>"
        handle: TextIO = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        close = False
        detach = True
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            handle = open(source, encoding="utf-8-sig", newline="")  # noqa: SIM115
        except OSError as exc:
            raise GatewayConfigError(f"{name}: cannot open: {exc.strerror or exc}") from None
        close = True
        detach = False
    else:
        name = getattr(source, "name", "<file>")
        handle = source
        close = detach = False
    reader = csv.reader(handle, strict=True)
    done = 0
    try:
        header = next(reader, None)
        if header is None:
            raise GatewayConfigError(f"{name}: empty file, expected a header line "
                                     "(ue_service_id,key,...)")
        columns = _columns(header, name)
        done = reader.line_num
        width = len(columns)
        for fields in reader:
            if fields and fields != [""]:
                line = done + 1
                if len(fields) != width:
                    raise GatewayConfigError(
                        f"{name} line {line}: expected {width} fields, found {len(fields)}")
                row = dict(zip(columns, fields, strict=True))
                uid = row["ue_service_id"]
                if wanted is None or uid in wanted:
                    yield line, _ue(row, name, line)
            done = reader.line_num
    except csv.Error as exc:
        raise GatewayConfigError(f"{name} line {done + 1}: {exc}") from None
    except UnicodeDecodeError:
        raise GatewayConfigError(f"{name} line {done + 1}: not valid UTF-8") from None
    except OSError as exc:
        raise GatewayConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    finally:
        if close:
            handle.close()
        elif detach:
            handle.detach()  # closing our wrapper must not close standard input


def _columns(header: list[str], name: str) -> list[str]:
    columns = [c.strip() for c in header]
    for column in columns:
        if column not in COLUMNS:
            close = difflib.get_close_matches(column, COLUMNS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise GatewayConfigError(
                f"{name} line 1: unknown column {column!r}{hint}; columns are "
                + ", ".join(COLUMNS))
    if len(set(columns)) != len(columns):
        raise GatewayConfigError(f"{name} line 1: a column is named twice")
    if "ue_service_id" not in columns:
        raise GatewayConfigError(f"{name} line 1: the header must name ue_service_id")
    return columns


def _ue(row: dict[str, str], name: str, line: int) -> GatewayUe:
    where = f"{name} line {line}"
    key_text = row.get("key", "").strip()
    key: bytes | None = None
    if key_text:
        # fromhex skips spaces, so check the length of the text and of the result.
        try:
            key = bytes.fromhex(key_text) if len(key_text) == KEY_HEX else b""
        except ValueError:
            key = b""
        if len(key) != KEY_HEX // 2:
            raise GatewayConfigError(f"{where}: key must be {KEY_HEX} hex digits")
    profile = _profile(row, where)
    try:
        return GatewayUe(row["ue_service_id"], key, profile)
    except ValueError as exc:
        raise GatewayConfigError(f"{where}: {exc}") from None


def _profile(row: dict[str, str], where: str) -> Profile | None:
    values: dict[str, Any] = {}
    for column in PROFILE_COLUMNS:
        text = row.get(column, "").strip()
        if text:
            try:
                values[column] = _PARSE[column](text)
            except ValueError as exc:
                raise GatewayConfigError(f"{where}: {column}: {exc}") from None
    return Profile(**values) if values else None


def _uint(text: str, maximum: int) -> int:
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    value = int(text)
    if value > maximum:
        raise ValueError(f"{value} is more than {maximum}")
    return value


def _named(table: dict[str, Any], text: str, what: str) -> int:
    if text.isdigit():
        value = int(text)
        if value in {int(v) for v in table.values()}:
            return value
    key = text.lower().replace("-", "_")
    key = key.removesuffix("_ue")
    if key in table:
        return int(table[key])
    choices = " | ".join(f"{k} ({int(v)})" for k, v in table.items())
    raise ValueError(f"{text!r} is not a {what}: {choices}")


def _identifier(text: str) -> str:
    size = len(text.encode("utf-8"))
    if size > TRIGGERING_UE_IDENTIFIER_MAX:
        raise ValueError(f"{size} octets, at most {TRIGGERING_UE_IDENTIFIER_MAX}")
    return text


def _availability(text: str) -> tuple[int, int]:
    period, sep, window = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r}: write PERIOD/WINDOW in seconds, e.g. 86400/600")
    return _uint(period.strip(), U32_MAX), _uint(window.strip(), U32_MAX)


def _hex_data(text: str) -> bytes:
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise ValueError("must be hex digits") from None
    if len(data) > APPLICATION_DATA_MAX:
        raise ValueError(f"{len(data)} octets, at most {APPLICATION_DATA_MAX}")
    return data


_PARSE: dict[str, Any] = {
    "ue_type": lambda t: _named(_UE_TYPES, t, "UE type"),
    "triggering_ue_identifier": _identifier,
    "triggering_port": lambda t: _uint(t, U16_MAX),
    "triggering_protocol": lambda t: _named(_PROTOCOLS, t, "triggering protocol"),
    "communication_availability": _availability,
    "maximum_segment_size": lambda t: _uint(t, U32_MAX),
    "application_data": _hex_data,
}


def _profile_cells(profile: Profile | None) -> list[str]:
    if profile is None:
        return [""] * len(PROFILE_COLUMNS)
    names = {int(v): k for k, v in _UE_TYPES.items()}
    protocols = {int(v): k for k, v in _PROTOCOLS.items()}
    ca = profile.communication_availability
    cells = {
        "ue_type": names.get(profile.ue_type, str(profile.ue_type))
        if profile.ue_type is not None else "",
        "triggering_ue_identifier": profile.triggering_ue_identifier or "",
        "triggering_port": "" if profile.triggering_port is None else str(profile.triggering_port),
        "triggering_protocol": protocols.get(profile.triggering_protocol,
                                             str(profile.triggering_protocol))
        if profile.triggering_protocol is not None else "",
        "communication_availability": f"{ca[0]}/{ca[1]}" if ca is not None else "",
        "maximum_segment_size": "" if profile.maximum_segment_size is None
        else str(profile.maximum_segment_size),
        "application_data": profile.application_data.hex()
        if profile.application_data is not None else "",
    }
    return [cells[c] for c in PROFILE_COLUMNS]
