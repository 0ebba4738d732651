"""One source of truth: the dissector's tables are wire/'s, in the file and in running tshark."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.wireshark.tools import LUA, load_gen_tables, require
from wire.constants import IEI, MESSAGE_NAMES, ErrorCause, FailureCause, MessageType

gen_tables = load_gen_tables()


def test_committed_lua_is_what_the_generator_writes():
    current = LUA.read_text()
    assert gen_tables.render(current) == current, (
        "contrib/wireshark/msgin5g.lua is out of date with wire/: run "
        "python contrib/wireshark/gen_tables.py")
    assert gen_tables.main(["--check"]) == 0


def test_generator_refuses_an_ie_it_cannot_present(monkeypatch):
    monkeypatch.delitem(gen_tables.PRESENTATION, IEI.RETRY_AFTER)
    with pytest.raises(SystemExit, match="RETRY_AFTER"):
        gen_tables.generate()


def _glossary(report: str, word: bytes = rb"msgin5g") -> list[list[str]]:
    """The rows of `tshark -G report` with a column starting with `word` (the whole report is
    ~100 MB, so the rows are picked out before decoding)."""
    exe = require("tshark", "tshark")
    proc = subprocess.run([exe, "-G", report, "-X", f"lua_script:{LUA}"], capture_output=True,
                          timeout=60, check=True)
    assert b"Lua" not in proc.stderr, proc.stderr
    rows = re.findall(rb"^[^\n]*\t" + word + rb"(?:[.\t][^\n]*)?$", proc.stdout, re.M)
    return [row.decode().split("\t") for row in rows]


def test_running_dissector_has_wires_names():
    """What tshark loaded (not only the file) names every message type, IE and cause of wire/."""
    values: dict[str, dict[int, str]] = {}
    for row in _glossary("values"):
        if row[0] == "V" and row[1].startswith("msgin5g."):
            values.setdefault(row[1], {})[int(row[2], 0)] = row[3]
    assert values["msgin5g.type"] == {int(t): MESSAGE_NAMES[t] for t in MessageType}
    assert values["msgin5g.cause"] == {int(c): c.name for c in FailureCause}
    assert values["msgin5g.error_cause"] == {int(c): c.name for c in ErrorCause}
    ie_names = values["msgin5g.ie.iei"]
    assert set(ie_names) == {int(i) for i in IEI}
    fields = {row[2] for row in _glossary("fields") if row[0] == "F"}
    for iei in IEI:
        label, name, _ = gen_tables.PRESENTATION[iei]
        assert ie_names[int(iei)] == label
        if gen_tables.value_shape(iei)["kind"] != "group":
            assert any(f == f"msgin5g.{name}" or f.startswith(f"msgin5g.{name}.")
                       for f in fields), name
    assert {"msgin5g.ue_id", "msgin5g.cause", "msgin5g.tid", "msgin5g.request_in",
            "msgin5g.response_in", "msgin5g.bulk.fragment_entries"} <= fields
    # v1.1 (docs/wireshark.md): the names the docs promise for registry sync.
    assert {"msgin5g.sync.supported", "msgin5g.sync.bucket_bits", "msgin5g.sync.first_bucket",
            "msgin5g.sync.digest", "msgin5g.sync.bucket", "msgin5g.sync.ue_hash",
            "msgin5g.release", "msgin5g.sync.fragment", "msgin5g.sync.fragment_buckets",
            "msgin5g.sync.buckets_so_far", "msgin5g.sync.bucket_count",
            "msgin5g.sync.last"} <= fields


def test_registered_on_tls_port_and_for_decode_as():
    decodes = {tuple(row) for row in _glossary("decodes", rb"7554")}
    assert ("tcp.port", "7554", "tls") in decodes  # TLS on the default port
    assert ("tls.port", "7554", "msgin5g") in decodes  # its decrypted data
    # ALPN "msgin5g-gw/1" (any port) is what test_tls_session's random port relies on.
