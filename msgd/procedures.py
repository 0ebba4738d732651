"""The four per-UE procedures of TS 23.554 8.2 that msgd answers (metrics label them)."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Procedure"]


class Procedure(IntEnum):
    """Which procedure an answer belongs to. An IntEnum: the connection keeps one per pending
    answer and compares them on its hot path."""

    REGISTRATION = 0
    DEREGISTRATION = 1
    BULK_REGISTRATION = 2
    BULK_DEREGISTRATION = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def is_bulk(self) -> bool:
        return self >= Procedure.BULK_REGISTRATION

    @property
    def is_registration(self) -> bool:
        return self is Procedure.REGISTRATION or self is Procedure.BULK_REGISTRATION
