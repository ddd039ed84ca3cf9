"""``render_envelope`` (the ENVELOPE a sealed store keeps from delivery) remembers the addresses it rendered
from one message to the next, within its bound, and renders every envelope exactly as a writer of its own
would, whatever the addresses (non-ASCII, quoted, groups, missing parts) and however full the memory is."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.imap.protocol import envelope as envelope_module
from gateway.imap.protocol.envelope import EnvelopeWriter, render_envelope

_PART = st.one_of(st.none(), st.sampled_from(["Dr A", "Zoé \"Z\" Ü", "jean.dupont", "lab.example", "", "g"]),
                  st.text(max_size=8))
_ADDRESS = st.lists(_PART, min_size=4, max_size=4)
_ENVELOPE = st.fixed_dictionaries({
    "date": _PART, "subject": _PART, "in-reply-to": _PART, "message-id": _PART,
    **{name: st.one_of(st.none(), st.lists(_ADDRESS, max_size=3))
       for name in ("from", "sender", "reply-to", "to", "cc", "bcc")}})


@settings(max_examples=300, deadline=None)
@given(st.lists(_ENVELOPE, min_size=1, max_size=6))
def test_render_envelope_is_a_writer_of_its_own(envelopes: list[dict[str, Any]]) -> None:
    for cached in envelopes:
        assert render_envelope(cached) == EnvelopeWriter(utf8=False).envelope(cached)


def test_the_addresses_are_remembered_across_messages_within_the_bound() -> None:
    remembered = envelope_module._DELIVERED_ADDRESSES
    remembered.clear()
    for number in range(EnvelopeWriter.MAX_REMEMBERED + 50):
        cached = {"subject": f"s{number}", "from": [["Dr A", None, "a", "lab.example"]],
                  "to": [[None, None, f"r{number}", "lab.example"]]}
        assert render_envelope(cached) == EnvelopeWriter(utf8=False).envelope(cached)
    assert ("Dr A", None, "a", "lab.example") in remembered
    assert len(remembered) == EnvelopeWriter.MAX_REMEMBERED
