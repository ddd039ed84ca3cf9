"""MIME depth in the streaming scan: multiparts and encapsulated messages (message/rfc822) both count.

A forward inside a forward inside a forward is as deep for a MIME parser as nested
multiparts (RFC 2046 5.1.1, 5.2.1); the limit protects every later parser (S/MIME, the DMP
bridge, IMAP BODYSTRUCTURE), so a hostile message must not be able to hide a level from it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.parse import ParseLimits, scan_stream
from gateway.mail.codes import MailRefusal

LIMIT = 6
LIMITS = ParseLimits(max_header_count=50, max_header_bytes=64 * 1024, max_mime_depth=LIMIT)
LEAF = b"Content-Type: text/plain; charset=utf-8\r\n\r\nfeuille\r\n"


def nested(kinds: Sequence[str], *, siblings: bool = False) -> bytes:
    """A message whose containers, outermost first, are ``kinds`` ("multipart" or "message")."""
    if not kinds:
        return LEAF
    inner = nested(kinds[1:], siblings=siblings)
    if kinds[0] == "message":
        return (b"Content-Type: message/rfc822\r\n\r\nSubject: transfert\r\nMIME-Version: 1.0\r\n" + inner)
    boundary = b"=_level%d" % len(kinds)
    extra = b"--" + boundary + b"\r\n" + LEAF if siblings else b""
    return (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\npreamble\r\n--" + boundary
            + b"\r\n" + inner + extra + b"--" + boundary + b"--\r\nepilogue\r\n")


def depth(data: bytes) -> int:
    return scan_stream(io.BytesIO(b"Subject: test\r\nMIME-Version: 1.0\r\n" + data), LIMITS).mime_depth


def refused(data: bytes) -> MailRefusal:
    with pytest.raises(MailRefusal) as caught:
        depth(data)
    return caught.value


kinds_strategy = st.lists(st.sampled_from(["multipart", "message"]), min_size=0, max_size=2 * LIMIT)


@settings(max_examples=300, deadline=None)
@given(kinds_strategy, st.booleans())
def test_every_container_counts(kinds: list[str], siblings: bool) -> None:
    data = nested(kinds, siblings=siblings)
    if len(kinds) <= LIMIT:
        assert depth(data) == len(kinds)
    else:
        reply = refused(data).reply
        assert (reply.code, reply.enhanced) == (554, "5.6.0")
        assert f"deeper than {LIMIT} levels" in reply.text


def test_forward_inside_forward_is_refused() -> None:
    assert depth(nested(["message"] * LIMIT)) == LIMIT
    assert refused(nested(["message"] * (LIMIT + 1))).reply.enhanced == "5.6.0"


def test_alternating_kinds_are_refused() -> None:
    assert refused(nested(["multipart", "message"] * LIMIT)).reply.code == 554


def test_very_deep_nesting_is_refused_without_recursion() -> None:
    """Ten thousand forwards: refused at the limit, reading line by line."""
    body = b"Content-Type: message/rfc822\r\n\r\n" * 10_000 + LEAF
    assert refused(body).reply.code == 554


def test_encoded_encapsulated_message_is_opaque() -> None:
    """RFC 2046 5.2.1 forbids encoding message/rfc822; a base64 one is a leaf, never read inside."""
    data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nQ29udGVudC1UeXBlOiBtZXNzYWdlL3JmYzgyMg==\r\n--b--\r\n")
    assert depth(data) == 1


def test_boundary_inside_a_part_header_is_still_a_boundary() -> None:
    """A delimiter where a part header was expected starts the next part (what MIME parsers do)."""
    data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX-Junk: 1\r\n--b\r\n"
            b"Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n"
            b"Content-Type: text/plain\r\n\r\nx\r\n--c--\r\n--b--\r\n")
    assert depth(data) == 3


def test_closed_levels_do_not_add_up() -> None:
    """Siblings at the same depth: the depth is the deepest branch, not the sum."""
    one = nested(["message", "multipart"])
    data = (b"Content-Type: multipart/mixed; boundary=top\r\n\r\n"
            + b"".join(b"--top\r\n" + one for _ in range(LIMIT * 3)) + b"--top--\r\n")
    assert depth(data) == 3


def test_huge_part_header_is_refused() -> None:
    """A part header beyond the header limit is refused rather than cut: a Content-Type after the cut
    would open a level the scan never saw."""
    junk = b"X-Junk: " + b"a" * 900 + b"\r\n"
    data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + junk * 80
            + b"Content-Type: message/rfc822\r\n\r\nSubject: x\r\n\r\nx\r\n--b--\r\n")
    reply = refused(data).reply
    assert (reply.code, reply.enhanced) == (554, "5.6.0") and "header section larger than" in reply.text


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bodies_never_crash(noise: bytes) -> None:
    """Any bytes after a multipart or message/rfc822 header: a depth or the catalogue refusal, nothing else."""
    for head in (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n", b"Content-Type: message/rfc822\r\n\r\n"):
        try:
            assert 1 <= depth(head + noise) <= LIMIT
        except MailRefusal as exc:
            assert exc.reply.enhanced == "5.6.0"


@pytest.mark.parametrize("padding", [0, 400], ids=["short-value-cached", "long-value-read-each-time"])
def test_a_repeated_content_type_counts_every_time(padding: int) -> None:
    """The Content-Type answers are kept for short values (``_content_type``): the same values, message after
    message, are containers each time, and a long value (beyond the kept length) is read as well."""
    parameters = b"".join(b"; x-pad%d=\"%s\"" % (i, b"p" * 40) for i in range(padding // 50))
    boundary = b"=_same"
    part = (b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"" + parameters + b"\r\n\r\n--" + boundary
            + b"\r\n" + LEAF + b"--" + boundary + b"--\r\n")
    message = b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"" + parameters + b"\r\n\r\n--" \
        + boundary + b"\r\n" + part + b"--" + boundary + b"--\r\n"
    assert len(parameters) > 256 if padding else not parameters
    for _ in range(3):
        assert depth(message) == 2
