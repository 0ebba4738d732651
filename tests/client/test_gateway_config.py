"""The gateway's UE file (TS 23.554 8.1.3): format, errors naming file and line, laziness."""

from __future__ import annotations

import io
import itertools
import stat
import sys

import pytest

from msgd.gateway import GatewayUe
from msgd.gateway.ue_file import GatewayConfigError, read_ues, scan_ues, write_ues
from wire.constants import TriggeringProtocol, UeType
from wire.messages import Profile

KEY = bytes(range(32))
KEY_HEX = KEY.hex()


def _file(tmp_path, text: str, name: str = "ues.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_the_demo_form_is_the_minimal_form(tmp_path):
    path = _file(tmp_path, f"ue_service_id,key\nue-0001@gw1.example,{KEY_HEX}\n\n"
                           f"ue-0002@gw1.example,{KEY_HEX.upper()}\n")
    assert list(read_ues(path)) == [GatewayUe("ue-0001@gw1.example", KEY),
                                    GatewayUe("ue-0002@gw1.example", KEY)]


def test_profile_columns_in_any_order(tmp_path):
    path = _file(tmp_path, (
        "\ufeffkey,ue_service_id,triggering_protocol,ue_type,communication_availability,"
        "triggering_port,triggering_ue_identifier,maximum_segment_size,application_data\n"
        f"{KEY_HEX},a@gw,sms,non_3gpp,86400/600,2000,+15550001,1200,0a0b\n"
        f"{KEY_HEX},b@gw,3,legacy-3gpp,,,,,\n"
        f",\"c,with comma@gw\",,,,,,,\n"))
    a, b, c = read_ues(path)
    assert a.profile == Profile(ue_type=UeType.NON_3GPP_UE, triggering_ue_identifier="+15550001",
                                triggering_port=2000, triggering_protocol=TriggeringProtocol.SMS,
                                communication_availability=(86400, 600),
                                maximum_segment_size=1200, application_data=b"\x0a\x0b")
    assert b.profile == Profile(ue_type=UeType.LEGACY_3GPP_UE,
                                triggering_protocol=TriggeringProtocol.IP)
    assert c == GatewayUe("c,with comma@gw")  # no key (a trusted gateway), no profile


def test_write_then_read_round_trip_and_private_mode(tmp_path):
    ues = [GatewayUe("a@gw", KEY, Profile(ue_type=2, triggering_port=7,
                                          communication_availability=(1, 2))),
           GatewayUe("b@gw", None), GatewayUe("c@gw", KEY, Profile(application_data=b""))]
    path = tmp_path / "out.csv"
    assert write_ues(path, ues) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(read_ues(path)) == [ues[0], ues[1], GatewayUe("c@gw", KEY)]


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("", "empty file", id="empty"),
    pytest.param("ue_service_id,kee\n", "unknown column 'kee' (did you mean key?)",
                 id="typo-in-header"),
    pytest.param("key\n", "must name ue_service_id", id="no-id-column"),
    pytest.param("ue_service_id,key,key\n", "named twice", id="column-twice"),
    pytest.param(f"ue_service_id,key\na@gw,{KEY_HEX}\nb@gw,{KEY_HEX[:-2]}\n",
                 "line 3: key must be 64 hex digits", id="short-key"),
    pytest.param(f"ue_service_id,key\na@gw,{KEY_HEX[:-1]}g\n", "line 2: key must be",
                 id="not-hex"),
    pytest.param(f"ue_service_id,key\na@gw,{KEY_HEX},extra\n", "line 2: expected 2 fields",
                 id="too-many-fields"),
    pytest.param(f"ue_service_id,key\n,{KEY_HEX}\n", "line 2: UE Service ID is empty",
                 id="empty-id"),
    pytest.param("ue_service_id,ue_type\na@gw,phone\n", "line 2: ue_type: 'phone' is not",
                 id="bad-ue-type"),
    pytest.param("ue_service_id,triggering_port\na@gw,70000\n", "more than 65535",
                 id="port-too-big"),
    pytest.param("ue_service_id,communication_availability\na@gw,3600\n", "PERIOD/WINDOW",
                 id="availability-form"),
    pytest.param("ue_service_id,triggering_ue_identifier\na@gw," + "9" * 65 + "\n",
                 "65 octets, at most 64", id="identifier-too-long"),
    pytest.param("ue_service_id,application_data\na@gw,zz\n", "must be hex", id="bad-data"),
    pytest.param('ue_service_id\n"a@gw\n', "line 2:", id="open-quote"),
])
def test_errors_name_file_and_line_and_never_the_key(tmp_path, text, message):
    path = _file(tmp_path, text)
    with pytest.raises(GatewayConfigError) as bad:
        list(read_ues(path))
    assert message in str(bad.value)
    assert str(bad.value).startswith(str(path))
    assert KEY_HEX[:16] not in str(bad.value)


def test_invalid_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"ue_service_id\nok@gw\n\xff\xfe@gw\n")
    with pytest.raises(GatewayConfigError, match="not valid UTF-8"):
        list(read_ues(path))
    with pytest.raises(GatewayConfigError, match="cannot open"):
        list(read_ues(tmp_path / "absent.csv"))


def test_reading_is_lazy():
    def endless():
        yield "ue_service_id,key\n"
        for n in itertools.count():
            yield f"ue-{n}@gw,{KEY_HEX}\n"

    first = list(itertools.islice(read_ues(endless()), 3))  # type: ignore[arg-type]
    assert [ue.ue_service_id for ue in first] == ["ue-0@gw", "ue-1@gw", "ue-2@gw"]


def test_standard_input(monkeypatch):
    data = f"ue_service_id,key\nx@gw,{KEY_HEX}\ny@gw,{KEY_HEX}\n".encode()
    stdin = io.TextIOWrapper(io.BytesIO(data))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert [ue.ue_service_id for ue in read_ues("-", only={"y@gw"})] == ["y@gw"]
    assert not stdin.closed  # reading "-" must not close standard input


def test_scan_counts_and_names_missing_only_ids(tmp_path):
    path = _file(tmp_path, "ue_service_id\n" + "".join(f"u{i}@gw\n" for i in range(50)))
    assert scan_ues(path).count == 50
    scan = scan_ues(path, only={"u3@gw", "u7@gw", "nobody@gw"})
    assert scan.count == 2 and scan.missing == ("nobody@gw",)
