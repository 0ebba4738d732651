"""messages.frozen_builder: the hot paths' way to make frozen dataclasses, without the frozen
__init__ and without swapping an object's class."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.wire.helpers import Pair, bulk_frame, drain, reg_entry
from wire.constants import IEI, MessageType
from wire.events import BulkEntryReceived, _build_bulk_entry_received
from wire.messages import (
    _DEREGISTRATION_ENTRY,
    _PROFILE,
    _REGISTRATION_ENTRY,
    DeregistrationEntry,
    Profile,
    RegistrationEntry,
    decode_entry,
    encode_entry,
    frozen_builder,
)

PROFILE_VALUES = (2, "+15551230001", 2000, 1, (3600, 60), 1200, b"\x00")
BUILT: list[tuple[Any, type, tuple[Any, ...]]] = [
    (_REGISTRATION_ENTRY, RegistrationEntry, ("ue-1@gw1", bytes(32), Profile(ue_type=1))),
    (_DEREGISTRATION_ENTRY, DeregistrationEntry, ("ue-1@gw1", None, None)),
    (_PROFILE, Profile, PROFILE_VALUES),
    (_build_bulk_entry_received, BulkEntryReceived, (7, 3, RegistrationEntry("ue-2"), None)),
]


@pytest.mark.parametrize("build, cls, values", BUILT, ids=lambda x: getattr(x, "__name__", ""))
def test_built_objects_are_ordinary_instances(build: Any, cls: type, values: tuple[Any, ...]
                                              ) -> None:
    derived = [None] * sum(1 for f in dataclasses.fields(cls) if not f.init)  # Profile.octets
    made, built = cls(*values), build(*values, *derived)
    assert type(built) is cls
    assert built == made and hash(built) == hash(made) and repr(built) == repr(made)
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(built, first, None)
    assert dataclasses.replace(built) == made
    assert dataclasses.asdict(built) == dataclasses.asdict(made)


def test_only_slots_dataclasses_without_post_init() -> None:
    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    for cls in (NoSlots, PostInit):
        with pytest.raises(TypeError):
            frozen_builder(cls)


def test_the_decoders_and_the_session_hand_out_the_real_classes() -> None:
    entry = RegistrationEntry("ue-1@gw1", bytes(32), Profile(*PROFILE_VALUES))
    decoded = decode_entry(IEI.REGISTRATION_ENTRY, encode_entry(entry)[3:])
    assert type(decoded) is RegistrationEntry and type(decoded.profile) is Profile
    assert decoded == entry
    pair = Pair()
    pair.handshake()
    pair.server.receive_data(
        bulk_frame(MessageType.BULK_REGISTRATION_REQUEST, 5, [reg_entry("a")]), 0.0)
    events = drain(pair.server)
    assert [type(e).__name__ for e in events] == ["BulkStarted", "BulkEntryReceived", "BulkEnded"]
    assert type(events[1]) is BulkEntryReceived and type(events[1].entry) is RegistrationEntry


def test_no_object_changes_class_in_wire() -> None:
    """style: no `obj.__class__ = ...` anywhere in wire/ (frozen_builder replaced the trick)."""
    for path in sorted((Path(__file__).resolve().parents[2] / "wire").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign)
                       else [])
            for target in targets:
                assert not (isinstance(target, ast.Attribute) and target.attr == "__class__"), (
                    f"{path.name}:{node.lineno} assigns __class__")
