"""The provisioned subscriber store's rows and the CSV file they come from.

Each row says which key K_ue a Non-MSGin5G UE shares with the server (wire-v1 §6) and which
gateways may register it (wire-v1 §5, GATEWAY_NOT_AUTHORIZED). This module only reads and
checks rows; `provisioning_store.ProvisioningStore` stores them (table `provisioning`) and
answers lookups.

Keys are secrets: no message built here ever contains a key or any part of one.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from msgd.errors import ProvisioningError

__all__ = [
    "CSV_HEADER",
    "KEY_SIZE",
    "ProvisionedUe",
    "ProvisioningCsv",
    "decode_gateways",
    "encode_gateways",
    "identity_problem",
    "make_provisioned",
    "read_provisioning_csv",
    "validate_provisioned",
]

CSV_HEADER = ("ue_service_id", "key", "gateways")
KEY_SIZE = 32  # wire-v1 §6: K_ue is 32 octets
GATEWAY_SEPARATOR = ";"

# wire-v1 §3 (UE Service ID, Node name): UTF-8, 1-255 octets, no C0/C1 control characters
# (U+0000-U+001F, U+0080-U+009F; DEL is neither), exactly as wire/ies.py checks them, so
# every id the wire accepts can be provisioned.
MAX_IDENTITY_OCTETS = 255
_CONTROL = re.compile("[\x00-\x1f\x80-\x9f]")

# Part of every file digest: a file that passed older checks is re-read when the checks change.
_DIGEST_TAG = b"msgd provisioning csv v1\n"


@dataclass(frozen=True, slots=True)
class ProvisionedUe:
    """One provisioned Non-MSGin5G UE: its key K_ue and the gateways allowed to serve it."""

    ue_service_id: str
    key: bytes  # 32 octets; never log it
    gateways: frozenset[str]

    def __repr__(self) -> str:
        # The default repr would print the key into any log line or traceback that shows a row.
        return (
            f"ProvisionedUe(ue_service_id={self.ue_service_id!r}, key=<{len(self.key)} octets>, "
            f"gateways={sorted(self.gateways)!r})"
        )


# The frozen dataclass __init__ sets each field through object.__setattr__, about three times
# the cost of the slot descriptors; rows built from checked values (CSV lines, database rows,
# one per registration entry) go through make_provisioned() instead.
_new_row = object.__new__
_set_ue_service_id = ProvisionedUe.ue_service_id.__set__  # type: ignore[attr-defined]
_set_key = ProvisionedUe.key.__set__  # type: ignore[attr-defined]
_set_gateways = ProvisionedUe.gateways.__set__  # type: ignore[attr-defined]


def make_provisioned(ue_service_id: str, key: bytes, gateways: frozenset[str]) -> ProvisionedUe:
    """ProvisionedUe(ue_service_id, key, gateways), faster, for values already checked."""
    row = _new_row(ProvisionedUe)
    _set_ue_service_id(row, ue_service_id)
    _set_key(row, key)
    _set_gateways(row, gateways)
    return row


def identity_problem(value: object, what: str) -> str | None:
    """Return why `value` is not a valid wire-v1 §3 identity (UE Service ID, gateway), or None."""
    if _plain_identity(value):
        return None
    if not isinstance(value, str):
        return f"{what} must be text"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return f"{what} is not valid UTF-8"
    if size == 0:
        return f"{what} is empty"
    if size > MAX_IDENTITY_OCTETS:
        return f"{what} is {size} octets, more than {MAX_IDENTITY_OCTETS}"
    if _CONTROL.search(value):
        return f"{what} contains a control character"
    return None


def _plain_identity(value: object) -> bool:
    """The common case, without encoding: printable ASCII holds no control character and has
    one octet per character."""
    return (
        value.__class__ is str
        and value.isascii()  # type: ignore[attr-defined]
        and value.isprintable()  # type: ignore[attr-defined]
        and 0 < len(value) <= MAX_IDENTITY_OCTETS  # type: ignore[arg-type]
    )


def validate_provisioned(row: ProvisionedUe) -> None:
    """Raise ProvisioningError unless `row` can be stored (same rules as the CSV file)."""
    problem = identity_problem(row.ue_service_id, "ue_service_id")
    if problem is None:
        problem = _key_problem(row.key) or _gateways_problem(row.gateways)
    if problem is not None:
        raise ProvisioningError(f"provisioning row: {problem}")


def _key_problem(key: object) -> str | None:
    if key.__class__ is not bytes or len(key) != KEY_SIZE:  # type: ignore[arg-type]
        return f"key must be {KEY_SIZE} octets"
    return None


def _gateways_problem(gateways: object) -> str | None:
    if not isinstance(gateways, frozenset) or not gateways:
        return "gateways must name at least one gateway"
    for gateway in gateways:
        problem = identity_problem(gateway, "gateway identity")
        if problem is not None:
            return problem
        if GATEWAY_SEPARATOR in gateway:
            return f"gateway identity contains {GATEWAY_SEPARATOR!r}"
    return None


def encode_gateways(gateways: Iterable[str]) -> str:
    """Encode a gateway set as the `gateways` column: sorted, ';'-separated (stable for diffs)."""
    return GATEWAY_SEPARATOR.join(sorted(gateways))


def decode_gateways(text: str) -> frozenset[str]:
    """Decode the `gateways` column written by encode_gateways()."""
    return frozenset(text.split(GATEWAY_SEPARATOR)) if text else frozenset()


def file_digest(path: Path) -> bytes:
    """The digest ProvisioningCsv.digest() has once it has read all of an unchanged `path`."""
    digest = hashlib.sha256(_DIGEST_TAG)
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise ProvisioningError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return digest.digest()


class ProvisioningCsv(Iterator[ProvisionedUe]):
    """The rows of a provisioning CSV file, checked line by line as they are read.

    Also records a digest of the octets it read, so Registry.replace_provisioning() can tell
    that a file is the one the stored provisioning came from and skip rewriting it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.started = False
        self._digest = hashlib.sha256(_DIGEST_TAG)
        self._complete = False
        self._rows = self._read()

    def __iter__(self) -> Iterator[ProvisionedUe]:
        return self._rows  # a for loop then runs the generator without a wrapper per row

    def __next__(self) -> ProvisionedUe:
        return next(self._rows)

    def digest(self) -> bytes | None:
        """Digest of the whole file once every row has been read without error, else None."""
        return self._digest.digest() if self._complete else None

    def _read(self) -> Iterator[ProvisionedUe]:
        self.started = True
        name = str(self.path)
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed by the generator's finally
        except OSError as exc:
            raise ProvisioningError(f"{name}: cannot open: {exc.strerror or exc}") from None
        # csv handles quoted ids (an id may hold a comma); strict makes bad quoting an error.
        reader = csv.reader(self._lines(handle, name), strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ProvisioningError(f"{name}: empty file, expected the header line")
            if tuple(header) != CSV_HEADER:
                raise ProvisioningError(
                    f"{name} line {reader.line_num}: header must be exactly {','.join(CSV_HEADER)}"
                )
            seen: set[str] = set()
            gateway_cache: dict[str, frozenset[str]] = {}
            # Messages name the line a record starts on: a stray quote makes csv read on to
            # the end of the file, and that line would point nowhere near the mistake.
            done = reader.line_num
            for fields in reader:
                if fields:  # else a blank line
                    row = _parse_fields(fields, gateway_cache)
                    if row.__class__ is str:
                        raise ProvisioningError(f"{name} line {done + 1}: {row}")
                    size = len(seen)
                    seen.add(row.ue_service_id)  # type: ignore[union-attr]
                    if len(seen) == size:
                        raise ProvisioningError(f"{name} line {done + 1}: duplicate ue_service_id")
                    yield row  # type: ignore[misc]
                done = reader.line_num
            self._complete = True
        except csv.Error as exc:
            raise ProvisioningError(f"{name} line {done + 1}: {exc}") from None
        except OSError as exc:
            raise ProvisioningError(f"{name}: cannot read: {exc.strerror or exc}") from None
        finally:
            handle.close()

    def _lines(self, handle: BinaryIO, name: str) -> Iterator[str]:
        """Decode (and digest) the file in blocks; csv reads the lines of each block in C.

        Lines are split on LF only (StringIO with newline=""), as csv expects; a decoding error
        is placed by counting the LFs before it.
        """
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        tail = ""
        lines_before = 0
        first = True
        while True:
            block = handle.read(1 << 20)
            self._digest.update(block)
            chunk = block
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]  # byte order mark written by some spreadsheet programs
            first = False
            try:
                text = tail + decoder.decode(chunk, final=not block)
            except UnicodeDecodeError as exc:
                line = lines_before + chunk[: exc.start].count(b"\n") + 1
                raise ProvisioningError(f"{name} line {line}: not valid UTF-8") from None
            lines_before += chunk.count(b"\n")
            if not block:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            tail = text[cut:]
            yield from io.StringIO(text[:cut], newline="")


def read_provisioning_csv(path: Path) -> ProvisioningCsv:
    """Iterate the rows of a provisioning CSV file (an Iterator[ProvisionedUe]).

    The header is exactly `ue_service_id,key,gateways`; `key` is 64 hex characters (K_ue);
    `gateways` is a ';'-separated list of gateway identities. Blank lines are skipped and a
    UTF-8 byte order mark is tolerated. The first bad line raises ProvisioningError naming the
    file and line, e.g. "ues.csv line 7: key must be 64 hex characters"; a message never
    contains key material. Rows are streamed, so a caller that stores them must do so
    atomically (Registry.replace_provisioning does).
    """
    return ProvisioningCsv(path)


def _parse_fields(
    fields: list[str], gateway_cache: dict[str, frozenset[str]]
) -> ProvisionedUe | str:
    """One data line -> a row, or the reason it is bad (the caller adds file and line)."""
    if len(fields) != len(CSV_HEADER):
        return f"expected {len(CSV_HEADER)} fields, found {len(fields)}"
    ue_service_id, key_hex, gateways_text = fields
    if not _plain_identity(ue_service_id):
        problem = identity_problem(ue_service_id, "ue_service_id")
        if problem is not None:
            return problem
    # fromhex skips whitespace, so 64 characters holding a space decode to fewer than 32 octets:
    # checking both lengths admits exactly 64 hex digits.
    try:
        key = bytes.fromhex(key_hex) if len(key_hex) == 2 * KEY_SIZE else b""
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        return "key must be 64 hex characters"
    gateways = gateway_cache.get(gateways_text)
    if gateways is None:
        # Few distinct gateway lists exist; check and build each once.
        if not gateways_text.strip():
            return "gateways must name at least one gateway"
        items = [item.strip() for item in gateways_text.split(GATEWAY_SEPARATOR)]
        for item in items:
            problem = identity_problem(item, "gateway identity")
            if problem is not None:
                return problem
        gateways = frozenset(items)
        if len(gateway_cache) < 4096:
            gateway_cache[gateways_text] = gateways
    return make_provisioned(ue_service_id, key, gateways)
