"""FrameClock (server.frame_clock) driven octet by octet: frames built by the wire encoder."""

from __future__ import annotations

from msgd.server.frame_clock import FrameClock
from wire.messages import Keepalive, UeRegistrationRequest, encode_message


def frames() -> bytes:
    return encode_message(Keepalive(0)) + encode_message(
        UeRegistrationRequest(7, "ue-1@example.net", None, None))


def test_whole_frames_leave_the_clock_stopped() -> None:
    clock = FrameClock()
    assert clock.follow(frames(), 1.0) == (2, False)
    assert clock.since is None


def test_octet_by_octet_the_clock_runs_from_each_frames_first_octet() -> None:
    data = frames()
    first_len = len(encode_message(Keepalive(0)))
    clock = FrameClock()
    completed = 0
    for index, octet in enumerate(data):
        now = float(index)
        done, started = clock.follow(bytes([octet]), now)
        completed += done
        at_boundary = index + 1 in (first_len, len(data))
        began_here = index in (0, first_len)
        assert started == (began_here and not at_boundary), index
        if at_boundary:
            assert clock.since is None, index
        else:
            # The incomplete frame began at its first octet, not at the latest one.
            assert clock.since == (0.0 if index < first_len else float(first_len)), index
    assert completed == 2


def test_a_frame_beginning_after_a_complete_one_in_the_same_read_restarts_it() -> None:
    data = frames()
    clock = FrameClock()
    assert clock.follow(data[:3], 1.0) == (0, True)
    # The rest of frame one and the start of frame two arrive together at 5.0.
    first_len = len(encode_message(Keepalive(0)))
    assert clock.follow(data[3 : first_len + 2], 5.0) == (1, True)
    assert clock.since == 5.0
    assert clock.follow(data[first_len + 2 : first_len + 4], 9.0) == (0, False)
    assert clock.since == 5.0


def test_restart_only_when_a_frame_is_open() -> None:
    clock = FrameClock()
    assert not clock.restart(3.0)
    clock.follow(frames()[:5], 1.0)
    assert clock.restart(3.0)
    assert clock.since == 3.0
