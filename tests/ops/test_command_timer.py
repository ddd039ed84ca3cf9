"""``timed``: every command's time is observed in ``gateway_command_seconds``, once per command, whether the
command returns or raises (the histogram's child per protocol and verb is kept, not looked up each time)."""

from __future__ import annotations

import pytest

from gateway.ops.metrics import REGISTRY, timed


def _count(protocol: str, command: str) -> float:
    value = REGISTRY.get_sample_value("gateway_command_seconds_count", {"protocol": protocol, "command": command})
    return value or 0.0


def test_each_command_is_observed_once_under_its_own_labels() -> None:
    before_mail, before_rcpt = _count("smtp", "MAIL"), _count("smtp", "RCPT")
    for _ in range(3):
        with timed("smtp", "MAIL"):
            pass
    with timed("smtp", "RCPT"):
        pass
    assert _count("smtp", "MAIL") == before_mail + 3
    assert _count("smtp", "RCPT") == before_rcpt + 1


def test_a_command_that_raises_is_observed_and_its_error_goes_on() -> None:
    before = _count("imap", "FETCH")
    with pytest.raises(RuntimeError, match="store unavailable"), timed("imap", "FETCH"):
        raise RuntimeError("store unavailable")
    assert _count("imap", "FETCH") == before + 1
