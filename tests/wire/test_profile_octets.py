"""One representation of a profile from the wire to the store and back (issue 11): the
canonical value octets (docs/protocol.md §6.1), which the fast decoder hands over as received
and profile_octets() otherwise makes with the construct-declared encoder."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire.strategies import any_profiles
from wire.constants import IEI
from wire.messages import (
    PROFILE_SPEC,
    Profile,
    RegistrationEntry,
    decode_entry,
    decode_profile,
    encode_entry,
    encode_group,
    message_fields,
    profile_octets,
)


@settings(max_examples=200, deadline=None)
@given(any_profiles)
def test_received_octets_are_the_canonical_encoding(profile: Profile) -> None:
    canonical = encode_group(PROFILE_SPEC, profile)
    entry = decode_entry(IEI.REGISTRATION_ENTRY, _entry_value(profile))
    assert entry.profile == profile
    # The fast path kept what it received, and that is exactly the canonical form.
    assert entry.profile.octets == canonical
    assert profile_octets(entry.profile) == canonical
    assert decode_profile(canonical) == profile
    # A profile built by hand has no octets yet: they are made from its fields.
    assert profile.octets is None and profile_octets(profile) == canonical


@settings(max_examples=50, deadline=None)
@given(any_profiles, st.binary(max_size=8))
def test_unknown_optional_sub_ies_are_not_part_of_it(profile: Profile, junk: bytes) -> None:
    """An unknown optional sub-IE (0x7E, bit 7 clear) is skipped by the decoder (wire-v1 §3):
    the stored form is the profile without it."""
    canonical = encode_group(PROFILE_SPEC, profile)
    received = bytes([0x7E, 0, len(junk)]) + junk + canonical
    entry = decode_entry(IEI.REGISTRATION_ENTRY, _entry_value(profile, received))
    assert entry.profile == profile
    assert profile_octets(entry.profile) == canonical


def test_octets_stay_out_of_equality_and_fields() -> None:
    profile = Profile(ue_type=1)
    received = decode_profile(profile_octets(profile))
    fast = decode_entry(IEI.REGISTRATION_ENTRY, _entry_value(profile)).profile
    assert fast.octets is not None and received == fast == profile
    assert hash(fast) == hash(profile) and repr(fast) == repr(profile)
    assert "octets" not in message_fields(fast)


def _entry_value(profile: Profile, profile_value: bytes | None = None) -> Any:
    """The Registration entry IE's value carrying `profile` (or these profile octets)."""
    encoded = encode_entry(RegistrationEntry("ue-1@example.net", None, profile))
    value = encoded[3:]  # the entry IE's own header off
    if profile_value is None:
        return value
    uid_ie_end = 3 + value[2]
    return value[:uid_ie_end] + bytes([0x03]) + len(profile_value).to_bytes(2, "big") + \
        profile_value
