"""The text rule of wire-v1 §3 (UTF-8, a length range, no C0/C1 controls) is written once for
the fast codec, in wire/ies.py: text_or_none to decode, octets_or_none to encode."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from wire.constants import IEI, UE_SERVICE_ID_MAX
from wire.ies import FAST, octets_or_none, reference_value, text_or_none
from wire.messages import RegistrationResponseEntry, encode_entry

WIRE = Path(__file__).resolve().parents[2] / "wire"
TEXTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LIMITS = st.tuples(st.integers(0, 8), st.integers(0, 80))


@given(TEXTS, LIMITS, st.booleans())
def test_encoding_and_decoding_agree(text: str, limits: tuple[int, int], no_controls: bool
                                     ) -> None:
    low, high = limits
    data = text.encode("utf-8")
    decoded = text_or_none(data, 0, len(data), low, high, no_controls)
    assert octets_or_none(text, low, high, no_controls) == (data if decoded == text else None)


@given(st.binary(max_size=20), st.integers(0, 20), st.integers(0, 20))
def test_decoding_a_slice_is_decoding_the_slice(raw: bytes, start: int, end: int) -> None:
    end = min(max(start, end), len(raw))
    assert text_or_none(raw, start, end, 0, 20) == text_or_none(raw[start:end], 0, end - start,
                                                                 0, 20)


@given(TEXTS)
def test_the_ue_service_id_codec_and_the_entry_shortcut_use_the_rule(text: str) -> None:
    """FAST[UE_SERVICE_ID].encode, the construct reference and encode_entry's shortcut accept
    the same UE Service IDs (the shortcut falls back to the generic encoder otherwise)."""
    ok = octets_or_none(text, 1, UE_SERVICE_ID_MAX) is not None
    try:
        FAST[IEI.UE_SERVICE_ID].encode(text)
    except ValueError:
        assert not ok or not text
    else:
        assert ok or not text  # 0 octets: only legal in an INVALID_ENTRY answer
    if ok:
        assert reference_value(IEI.UE_SERVICE_ID, text.encode("utf-8")) == text
        encoded = encode_entry(RegistrationResponseEntry(text, 0))
        assert encoded[6 : 6 + len(text.encode("utf-8"))] == text.encode("utf-8")


def test_only_ies_spells_out_the_control_rule() -> None:
    """No other wire module has its own copy of the check (isprintable / the C0/C1 pattern)."""
    for path in sorted(WIRE.glob("*.py")):
        if path.name == "ies.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute):
                assert node.attr != "isprintable", f"{path.name}:{node.lineno}"
            if isinstance(node, ast.Name | ast.alias):
                name = node.id if isinstance(node, ast.Name) else node.name
                assert name != "_CONTROL", f"{path.name}:{getattr(node, 'lineno', '?')}"
