"""The suite-wide secret scan: no K_ue, proof or nonce a test used may appear in any msgd log.

Wired into tests/conftest.py:

* install() (pytest_configure) adds a logging handler that writes every record of the test
  process, in the daemon's own logfmt, to a session log under pytest's basetemp (the
  in-process servers, clients and registries log there), and wraps
  wire.credential.compute_proof / verify_proof / ProofChecker.check so every key, nonce and
  proof computed or checked anywhere in the test process is recorded. K_ue values
  written by tests/harness.py (Deployment.write_provisioning) are recorded through
  harness.SECRETS, and every ChildServer's log file through harness.LOG_FILES.
* finish() (pytest_sessionfinish) scans the session log, the ChildServer logs and every
  *.log under the session's temporary directory, and fails the run (exit status 1) naming
  the file and line of any secret found.

Why a session hook rather than a test named to run last: a hook runs after every test of the
run whatever was selected (-k, a single directory, a re-run of failures) and sees the logs of
all of them; a "last" test depends on collection order and sees nothing of tests after it.
tests/ops/test_secret_scan.py checks that the scanner finds planted leaks, so the hook can
fail.

Secrets are remembered by their first 8 octets (a 64-bit prefix: memory stays small with the
hundreds of thousands of proofs the streaming tests make; a chance match is ~2^-64 per window).
A log is searched for them as hex (any case, anywhere in a hex run, so a truncated key is
caught too), base64 (standard or URL-safe, an encoding starting anywhere in a run), Python
bytes literals (b'\\x..', also inside logfmt's escaping), and for PEM private key markers.
"""

from __future__ import annotations

import ast
import base64
import binascii
import logging
import re
import shutil
import sys
import tempfile
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["Prefixes", "finish", "install", "is_recorded", "remember", "scan_text"]

PREFIX = 8  # octets of a secret kept and searched for
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{16,}")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{12,}")
_BYTES_LITERAL = re.compile(r"""b'(?:[^'\\\n]|\\.){8,}?'|b"(?:[^"\\\n]|\\.){8,}?\"""")
_PEM_PRIVATE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|PRIVATE KEY-----")

_recorded = array("Q")
_state: dict[str, Any] = {}


def remember(secret: bytes) -> None:
    """Record a secret (K_ue, nonce, proof) that must never appear in a log."""
    if len(secret) >= PREFIX:
        _recorded.append(int.from_bytes(secret[:PREFIX], "big"))


def _trackable(prefix: int) -> bool:
    """Test keys like b"\\x05" * 32 are not searched for: their prefix would match unrelated
    text (a run of zeros, "AAAAAAAA") and they protect nothing."""
    return len(set(prefix.to_bytes(PREFIX, "big"))) >= 4


def is_recorded(secret: bytes) -> bool:
    value = int.from_bytes(secret[:PREFIX], "big")
    return value in _recorded


class Prefixes:
    """A sorted, de-duplicated table of secret prefixes for fast lookups."""

    def __init__(self, values: Iterable[int]) -> None:
        self._sorted = array("Q", sorted(v for v in set(values) if _trackable(v)))

    def __len__(self) -> int:
        return len(self._sorted)

    def __contains__(self, value: int) -> bool:
        table = self._sorted
        index = bisect_left(table, value)
        return index < len(table) and table[index] == value

    @classmethod
    def of(cls, secrets: Iterable[bytes]) -> Prefixes:
        return cls(int.from_bytes(s[:PREFIX], "big") for s in secrets if len(s) >= PREFIX)


def scan_text(text: str, prefixes: Prefixes) -> list[tuple[int, str]]:
    """(line number, what was found) for every secret or private key marker in `text`."""
    found: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if _PEM_PRIVATE.search(line):
            found.append((number, "a PEM private key"))
        what = _scan_line(line, prefixes)
        if what:
            found.append((number, what))
    return found


def _scan_line(line: str, prefixes: Prefixes) -> str | None:
    if not len(prefixes):
        return None
    width = 2 * PREFIX
    for match in _HEX_RUN.finditer(line):
        run = match.group()
        for start in range(len(run) - width + 1):
            if int(run[start : start + width], 16) in prefixes:
                return "a secret in hex"  # never echoed: the report must not leak it either
    for match in _B64_RUN.finditer(line):
        run = match.group()
        # 12 characters decode to 9 octets; a secret's encoding starts at a multiple of 4
        # from where its encoding starts, which may be any offset of the run.
        for start in range(len(run) - 11):
            chunk = run[start : start + 12]
            for altchars in (b"+/", b"-_"):
                try:
                    raw = base64.b64decode(chunk, altchars=altchars, validate=True)
                except (binascii.Error, ValueError):
                    continue
                if int.from_bytes(raw[:PREFIX], "big") in prefixes:
                    return "a secret in base64"
    if "\\x" in line or "\\\\x" in line:
        for candidate in (line, line.replace("\\\\", "\\")):
            for match in _BYTES_LITERAL.finditer(candidate):
                try:
                    raw = ast.literal_eval(match.group())
                except (ValueError, SyntaxError):
                    continue
                for start in range(len(raw) - PREFIX + 1):
                    if int.from_bytes(raw[start : start + PREFIX], "big") in prefixes:
                        return "a secret as a bytes literal"
    return None


# --- pytest wiring ------------------------------------------------------------------------


def install(config: Any) -> None:
    """pytest_configure: capture the test process's logs and record proofs, keys, nonces.

    The session log goes under pytest's basetemp (kept, like every tmp_path, for the last
    few runs), or a temporary directory removed after a clean scan.
    """
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        directory = factory.mktemp("msgd-suite-logs", numbered=False)
        owned = False
    else:
        directory = Path(tempfile.mkdtemp(prefix="msgd-suite-logs-"))
        owned = True
    path = directory / "in-process.log"
    from msgd.log import LogfmtFormatter

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(LogfmtFormatter())
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    _state.update(dir=directory, path=path, handler=handler, owned=owned)
    _wrap_credentials()


def _wrap_credentials() -> None:
    import wire.credential as credential

    if getattr(credential.compute_proof, "_msgd_recording", False):
        return
    real_compute = credential.compute_proof
    real_verify = credential.verify_proof

    # Kept cheap (the streaming tests compute hundreds of thousands of proofs in their send
    # loops): one prefix per proof; a key or nonce only when it differs from the last one.
    record = _recorded.append
    last: list[Any] = [None, None]

    def compute_proof(key: bytes, nonce: bytes, op: Any, ue_service_id: str) -> bytes:
        proof = real_compute(key, nonce, op, ue_service_id)
        record(int.from_bytes(proof[:PREFIX], "big"))
        if key is not last[0]:
            last[0] = key
            remember(bytes(key))
        if nonce is not last[1]:
            last[1] = nonce
            remember(bytes(nonce))
        return proof

    def verify_proof(key: bytes, nonce: bytes, op: Any, ue_service_id: str, proof: bytes) -> bool:
        remember(bytes(proof))
        return real_verify(key, nonce, op, ue_service_id, proof)

    # The server checks proofs through ProofChecker (one per session): the proofs it is shown
    # and the keys it checks them with are secrets as well.
    real_check = credential.ProofChecker.check

    def check(self: Any, key: bytes, op: Any, ue_service_id: str, proof: bytes) -> bool:
        remember(bytes(proof))
        if key is not last[0]:
            last[0] = key
            remember(bytes(key))
        return real_check(self, key, op, ue_service_id, proof)

    check.__doc__ = real_check.__doc__
    credential.ProofChecker.check = check  # type: ignore[method-assign]

    compute_proof._msgd_recording = True  # type: ignore[attr-defined]
    compute_proof.__doc__ = real_compute.__doc__
    verify_proof.__doc__ = real_verify.__doc__
    credential.compute_proof = compute_proof  # type: ignore[assignment]
    credential.verify_proof = verify_proof  # type: ignore[assignment]
    # Modules that imported the names already (none should have, this runs first) get them too.
    for name, attr, wrapper in (("msgd.gateway.scheduler", "compute_proof", compute_proof),):
        module = sys.modules.get(name)
        if module is not None:
            setattr(module, attr, wrapper)


def log_files(session: Any) -> list[Path]:
    """The logs to scan: the session log, every ChildServer log, *.log under basetemp."""
    files: list[Path] = []
    if "path" in _state:
        files.append(_state["path"])
    harness = sys.modules.get("tests.harness")
    if harness is not None:
        files.extend(getattr(harness, "LOG_FILES", []))
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        try:
            base = factory.getbasetemp()
        except (OSError, ValueError):
            base = None
        if base is not None and base.exists():
            files.extend(base.rglob("*.log"))
    unique: dict[Path, None] = {}
    for path in files:
        if path.exists():
            unique.setdefault(path.resolve(), None)
    return list(unique)


def finish(session: Any) -> list[str]:
    """pytest_sessionfinish: scan every log; a finding fails the session."""
    handler = _state.get("handler")
    if handler is not None:
        handler.flush()
    harness = sys.modules.get("tests.harness")
    values: list[int] = list(_recorded)
    if harness is not None:
        values.extend(int.from_bytes(s[:PREFIX], "big")
                      for s in getattr(harness, "SECRETS", ()) if len(s) >= PREFIX)
    prefixes = Prefixes(values)
    findings: list[str] = []
    files = log_files(session)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, what in scan_text(text, prefixes):
            findings.append(f"{path}:{number}: {what}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (f"secret scan: {len(prefixes)} secrets, {len(files)} log files, "
               f"{len(findings)} findings")
    if reporter is not None:
        reporter.write("\n")
    if findings:
        if reporter is not None:
            reporter.write_sep("=", "SECRETS FOUND IN LOGS", red=True)
            for finding in findings[:50]:
                reporter.write_line(finding)
            reporter.write_line(summary + f" (logs kept in {_state.get('dir')})")
        session.exitstatus = 1
    else:
        if reporter is not None:
            reporter.write_line(summary)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
            if _state.get("owned"):
                shutil.rmtree(_state["dir"], ignore_errors=True)
    return findings
