"""The bytes local delivery stores for a message held in memory (``delivered_bytes``) are exactly what the
delivery stream reads (``DeliveryStream``: our trace fields, then the message without the forged
``Authentication-Results`` fields of our authserv-id, RFC 8601 5), whatever the message: the one-piece path
taken when the header section names no such field must never differ from the stream."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.queue.local_delivery import CHUNK, DeliveryStream, delivered_bytes

AUTHSERV = "mx.gw.example"
TRACE = b"Return-Path: <a@b.example>\r\nReceived: from x by y; Fri, 04 Dec 2026 12:00:00 +0000\r\n"


def _streamed(trace: bytes, message: bytes, authserv_id: str) -> bytes:
    with io.BufferedReader(DeliveryStream(trace, io.BytesIO(message), authserv_id), CHUNK) as stream:
        return stream.read()


_ENDINGS = st.sampled_from([b"\r\n", b"\n", b""])
_NAMES = st.sampled_from([b"Subject", b"Authentication-Results", b"authentication-RESULTS ", b"X-Authentication-Results",
                          b"From", b"Received", b" folded", b"\tfolded", b""])
_VALUES = st.one_of(
    st.sampled_from([b" mx.gw.example; spf=pass", b" MX.GW.EXAMPLE ; dkim=fail", b" other.example; auth=pass",
                     b" mx.gw.example", b" authentication-results", b"", b" x"]),
    st.binary(max_size=30))
_LINE = st.builds(lambda name, value, ending: name + b":" + value + ending, _NAMES, _VALUES, _ENDINGS)
_RAW_LINE = st.builds(lambda data, ending: data + ending, st.binary(max_size=20), _ENDINGS)
_BODY = st.lists(st.one_of(_LINE, _RAW_LINE, st.sampled_from([b"\r\n", b"\n", b"\r"])), max_size=12).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(head=st.lists(st.one_of(_LINE, _RAW_LINE), max_size=10).map(b"".join),
       blank=st.sampled_from([b"\r\n", b"\n", b"", b"\r\n\r\n"]), body=_BODY,
       authserv=st.sampled_from([AUTHSERV, "MX.gw.example", "other.example"]))
def test_delivered_bytes_are_what_the_stream_reads(head: bytes, blank: bytes, body: bytes, authserv: str) -> None:
    message = head + blank + body
    assert delivered_bytes(TRACE, message, authserv) == _streamed(TRACE, message, authserv)


def test_a_forged_field_is_dropped_and_a_clean_message_passes_as_it_is() -> None:
    forged = (b"Authentication-Results: mx.gw.example; auth=pass\r\n\tsmtp.auth=x\r\nSubject: s\r\n\r\n"
              b"Authentication-Results: mx.gw.example; in the body\r\n")
    assert delivered_bytes(TRACE, forged, AUTHSERV) == TRACE + forged[forged.index(b"Subject"):]
    clean = b"Subject: s\r\nFrom: <a@b.example>\r\n\r\nAuthentication-Results: mx.gw.example; body only\r\n"
    assert delivered_bytes(TRACE, clean, AUTHSERV) == TRACE + clean
