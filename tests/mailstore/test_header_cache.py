"""The address parsers keep their last answers by the field's text: a kept answer is the one a fresh parse
gives, immutable, and a different text (even one differing in case or spacing only) is parsed anew."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mailstore.headers import _addresses, address_search_text, parse_headers
from gateway.pipeline.parse import parse_mailbox_list

FIELDS = ["Dr Jean Dupont <jean.dupont@example.org>", "jean.dupont@example.org",
          '"Dupont, Jean" <jean.dupont@example.org>, =?utf-8?q?Ana=C3=AFs?= <anais@example.org>',
          "Équipe: a@example.org, b@example.org;", "JEAN.DUPONT@EXAMPLE.ORG", "a@ours <b@ours>", "", "<>"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FIELDS) | st.text(alphabet="aé<>@.,:;\" ()=?", max_size=30))
def test_kept_answers_are_the_fresh_ones(value: str) -> None:
    for cached in (parse_mailbox_list, address_search_text, _addresses):
        first = cached(value)
        assert first == cached.__wrapped__(value) == cached(value)     # type: ignore[attr-defined]


def test_kept_answers_cannot_be_changed_by_a_caller() -> None:
    authors = parse_mailbox_list(FIELDS[0])
    assert authors.addresses == ("jean.dupont@example.org",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        authors.addresses = ("someone@else.example",)               # type: ignore[misc]
    assert isinstance(_addresses(FIELDS[2]), tuple)
    # The envelope handed to IMAP is built fresh per message: changing one leaves the next one whole.
    section = f"From: {FIELDS[0]}\r\nTo: {FIELDS[1]}\r\n\r\n".encode()
    first = parse_headers(section)
    first.envelope["from"][0][0] = "changed"
    assert parse_headers(section).envelope["from"][0][0] == "Dr Jean Dupont"
    assert parse_mailbox_list(FIELDS[4]).addresses == ("JEAN.DUPONT@EXAMPLE.ORG",)
