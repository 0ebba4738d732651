"""What goes in and comes out of the gateway client: the UE to (de-)register (`GatewayUe`,
TS 23.554 8.1.3), the server's answer for it (`UeResult`), and what a tracer sees (`Trace`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from msgd.registry.provisioning import identity_problem
from wire.constants import FailureCause
from wire.credential import KEY_SIZE
from wire.messages import PROFILE_SPEC, Profile, encode_group

__all__ = ["GatewayUe", "Trace", "Tracer", "UeResult", "as_failure_cause"]


@dataclass(frozen=True, slots=True)
class GatewayUe:
    """One Non-MSGin5G UE as the gateway is configured for it (TS 23.554 clause 8.1.3).

    `key` is K_ue (32 octets; None for a gateway the server trusts, TS 33.501 Y.6); `profile`
    is the optional Non-MSGin5G UE profile sent with registrations. Checked when made, so a
    bad UE fails here and not in the middle of a bulk transaction.
    """

    ue_service_id: str
    key: bytes | None = None
    profile: Profile | None = None

    def __post_init__(self) -> None:
        problem = identity_problem(self.ue_service_id, "UE Service ID")
        if problem is not None:
            raise ValueError(problem)
        key = self.key
        if key is not None and (not isinstance(key, bytes) or len(key) != KEY_SIZE):
            raise ValueError(f"{self.ue_service_id}: the key must be {KEY_SIZE} octets")
        if self.profile is not None:
            try:
                encode_group(PROFILE_SPEC, self.profile)
            except Exception as exc:  # construct and wire errors alike: the profile is bad
                raise ValueError(f"{self.ue_service_id}: bad profile ({exc})") from None

    def __repr__(self) -> str:  # never show the key
        return f"GatewayUe({self.ue_service_id!r})"


@dataclass(frozen=True, slots=True)
class UeResult:
    """The server's answer for one UE (cause None means success)."""

    ue_service_id: str
    ok: bool
    cause: FailureCause | int | None = None
    retry_after: int | None = None
    attempts: int = 1

    @property
    def cause_name(self) -> str:
        if self.cause is None:
            return "SUCCESS"
        return getattr(self.cause, "name", str(self.cause))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what `msgctl gateway --json` prints)."""
        return {
            "ue_service_id": self.ue_service_id,
            "ok": self.ok,
            "cause": None if self.cause is None else self.cause_name,
            "retry_after": self.retry_after,
            "attempts": self.attempts,
        }


@dataclass(frozen=True, slots=True)
class Trace:
    """What a `tracer` callback receives: `event` is "sent" (a UE went out; `attempt` counts
    from 1), "busy" (SERVER_BUSY or OVERLOADED; it will be sent again after `retry_after` ms),
    "bulk" (a bulk transaction started; `count` entries) or "result". `time` is the event
    loop's clock."""

    event: str
    time: float
    ue_service_id: str = ""
    attempt: int = 0
    retry_after: int | None = None
    count: int = 0
    cause: FailureCause | int | None = None


Tracer = Callable[[Trace], None]


def as_failure_cause(value: int | None) -> FailureCause | int | None:
    """A Failure cause off the wire as the enum (wire-v1 §7.1), or the bare number when this
    version does not know it: an unknown cause is still the server's answer."""
    if value is None:
        return None
    try:
        return FailureCause(value)
    except ValueError:
        return value
