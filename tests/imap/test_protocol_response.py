"""Serialisers: strings, responses, ENVELOPE and BODYSTRUCTURE (RFC 3501 7, 9), capabilities."""

from __future__ import annotations

import datetime as dt
import pytest

from gateway.imap.protocol import response as r
from gateway.imap.protocol.capabilities import ConnectionState, compute_capabilities, unknown_names
from gateway.imap.protocol.errors import (
    NONEXISTENT, TRYCREATE, BadCommand, ImapNo, LiteralTooLarge, ParseError, ServerFault,
)
from gateway.imap.protocol.sequence import SequenceSet
from gateway.imap.protocol.mime import MimePart
from gateway.imap.protocol.structure import (
    MAX_MIME_DEPTH, body_octets, format_address_list, format_bodystructure, format_envelope, parse_message,
)

# --- strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "wire"), [
    ("hello", b'"hello"'),
    ('say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
    ("", b'""'),
    ("two\r\nlines", b"{10}\r\ntwo\r\nlines"),
    ("café", b"{5}\r\ncaf\xc3\xa9"),
    ("caf\udce9", b"{4}\r\ncaf\xe9"),          # surrogate-escaped 8-bit header octet comes back as is
])
def test_string_chooses_quoted_or_literal(value: str, wire: bytes) -> None:
    assert r.string(value) == wire


def test_utf8_may_be_quoted_once_enabled() -> None:
    """RFC 6855 3."""
    assert r.string("café", utf8=True) == '"café"'.encode()
    assert r.string(b"caf\xe9", utf8=True) == b"{4}\r\ncaf\xe9"


def test_nil_astring_and_mailbox() -> None:
    assert r.nstring(None) == b"NIL"
    assert r.astring("INBOX") == b"INBOX"
    assert r.astring("NIL") == b'"NIL"'
    assert r.astring("with space") == b'"with space"'
    assert r.mailbox("Éléments envoyés") == b'"&AMk-l&AOk-ments envoy&AOk-s"'
    assert r.mailbox("Éléments", utf8=True) == '"Éléments"'.encode()


# --- responses -------------------------------------------------------------------------


def test_fetch_puts_uid_first() -> None:
    """Thunderbird mis-assigns unsolicited FETCH data when UID is not first (ProtonMail bridge issue)."""
    wire = r.fetch(3, [("FLAGS", r.flag_list(["\\Seen"])), ("MODSEQ", b"(12)"), ("UID", b"42")])
    assert wire == b"* 3 FETCH (UID 42 FLAGS (\\Seen) MODSEQ (12))\r\n"


def test_status_lines() -> None:
    assert r.ok("a1", "SELECT completed", "READ-WRITE") == b"a1 OK [READ-WRITE] SELECT completed\r\n"
    assert r.no("a2", "No such mailbox", TRYCREATE) == b"a2 NO [TRYCREATE] No such mailbox\r\n"
    assert r.bad(None, "Missing tag") == b"* BAD Missing tag\r\n"
    assert r.continuation() == b"+ Ready\r\n"
    assert r.continuation_base64(b"") == b"+ \r\n"
    assert r.bye("Logging out") == b"* BYE Logging out\r\n"
    assert r.greeting("ready", ["IMAP4rev1", "STARTTLS"]) == b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"
    assert r.untagged_ok("UIDs valid", "UIDVALIDITY 3857529045") == b"* OK [UIDVALIDITY 3857529045] UIDs valid\r\n"


def test_untagged_data() -> None:
    assert r.exists(172) == b"* 172 EXISTS\r\n"
    assert r.recent(1) == b"* 1 RECENT\r\n"
    assert r.expunge(3) == b"* 3 EXPUNGE\r\n"
    assert r.flags(["\\Answered", "$Forwarded"]) == b"* FLAGS (\\Answered $Forwarded)\r\n"
    assert r.capability(["IMAP4rev1", "IDLE"]) == b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert r.enabled([]) == b"* ENABLED\r\n"
    assert r.search([2, 84, 882]) == b"* SEARCH 2 84 882\r\n"
    assert r.search([], highest_modseq=None) == b"* SEARCH\r\n"
    assert r.search([2, 5], highest_modseq=917162500) == b"* SEARCH 2 5 (MODSEQ 917162500)\r\n"
    assert r.vanished(SequenceSet.of((41, 43)), earlier=True) == b"* VANISHED (EARLIER) 41:43\r\n"
    assert r.esearch("A282", {"MIN": 2, "COUNT": 3}) == b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n'
    assert r.esearch("A3", {"ALL": SequenceSet.of((1, 3), 7)}, uid=True) == b'* ESEARCH (TAG "A3") UID ALL 1:3,7\r\n'
    assert r.list_response(["\\HasNoChildren", "\\Sent"], "/", "Envoyés") == \
        b'* LIST (\\HasNoChildren \\Sent) "/" Envoy&AOk-s\r\n'
    assert r.list_response(["\\Noselect"], None, "") == b'* LIST (\\Noselect) NIL ""\r\n'
    assert r.list_response([], "/", "Shared", extended_items=[r.childinfo("SUBSCRIBED")]) == \
        b'* LIST () "/" Shared ("CHILDINFO" ("SUBSCRIBED"))\r\n'
    assert r.status("blurdybloop", {"MESSAGES": 231, "UIDNEXT": 44292}) == \
        b"* STATUS blurdybloop (MESSAGES 231 UIDNEXT 44292)\r\n"
    assert r.id_response({"name": "gateway", "version": None}) == b'* ID ("name" "gateway" "version" NIL)\r\n'
    assert r.id_response(None) == b"* ID NIL\r\n"
    assert r.namespace([("", "/")]) == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    assert r.quota("", [("STORAGE", 10, 512)]) == b'* QUOTA "" (STORAGE 10 512)\r\n'
    assert r.quotaroot("INBOX", [""]) == b'* QUOTAROOT INBOX ""\r\n'
    assert r.internal_date(dt.datetime(1996, 7, 17, 2, 44, 25, tzinfo=dt.timezone(dt.timedelta(hours=-7)))) == \
        b'"17-Jul-1996 02:44:25 -0700"'
    assert r.response_code_uids("COPYUID", 38505, SequenceSet.of(304, (319, 320)), SequenceSet.of((3956, 3958))) \
        == "COPYUID 38505 304,319:320 3956:3958"


# --- errors -----------------------------------------------------------------------------


def test_errors_know_their_wire_form() -> None:
    missing = ImapNo("Mailbox does not exist", NONEXISTENT)
    assert missing.response("a") == b"a NO [NONEXISTENT] Mailbox does not exist\r\n"
    assert BadCommand("Nom inconnu: é").response("f") == b"f BAD Nom inconnu: ?\r\n"
    assert BadCommand("Unknown command").response("b") == b"b BAD Unknown command\r\n"
    assert ParseError("Missing tag").response() == b"* BAD Missing tag\r\n"
    assert ServerFault().response("c") == b"c NO [SERVERBUG] Internal server error\r\n"
    assert LiteralTooLarge(10, 5, synchronising=True).response("d").startswith(b"d NO [TOOBIG] ")
    assert LiteralTooLarge(10, 5, synchronising=False).response("d").startswith(b"d BAD [TOOBIG] ")
    assert BadCommand("line\r\nbreak").response("e") == b"e BAD line  break\r\n"


# --- ENVELOPE and BODYSTRUCTURE -----------------------------------------------------------

RFC3501_SAMPLE_HEADERS = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US,\r\n"
    b"    John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
)


def test_envelope_of_the_rfc3501_section_8_sample() -> None:
    """RFC 3501 8: the ENVELOPE of message 12 of the sample connection."""
    message = parse_message(RFC3501_SAMPLE_HEADERS + b"body\r\n")
    assert format_envelope(message) == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) (("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) ((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
        b'"<B27397-0100000@cac.washington.edu>")')
    assert format_bodystructure(message, extensible=False) == \
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 6 1)'


MULTIPART = (
    b'From: "Dr. Alice Martin" <alice.martin@hopital.example>\r\n'
    b"To: Bob <bob@cabinet.example>, undisclosed-recipients:;\r\n"
    b"Cc: =?utf-8?q?Chlo=C3=A9?= <chloe@lab.example>\r\n"
    b"Subject: =?utf-8?q?Compte_rendu?=\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <cr-1@hopital.example>\r\n"
    b"In-Reply-To: <req-7@cabinet.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="frontier"\r\n'
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--frontier\r\n"
    b'Content-Type: text/plain; charset="utf-8"\r\n'
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Bonjour,\r\n"
    b"voir le compte rendu.\r\n"
    b"--frontier\r\n"
    b'Content-Type: application/pdf; name="cr.pdf"\r\n'
    b'Content-Disposition: attachment; filename="cr.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Language: fr\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--frontier\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Description: original request\r\n"
    b"\r\n"
    b"From: bob@cabinet.example\r\n"
    b"To: alice.martin@hopital.example\r\n"
    b"Subject: Demande\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Merci.\r\n"
    b"--frontier--\r\n"
)


@pytest.fixture
def multipart() -> MimePart:
    return parse_message(MULTIPART)


def test_envelope_keeps_encoded_words_and_expands_groups(multipart: MimePart) -> None:
    """RFC 3501 7.4.2: raw header text; group syntax (NIL NIL name NIL) ... (NIL NIL NIL NIL)."""
    assert format_envelope(multipart) == (
        b'("Mon, 23 Nov 2026 10:00:00 +0100" "=?utf-8?q?Compte_rendu?=" '
        b'(("Dr. Alice Martin" NIL "alice.martin" "hopital.example")) '
        b'(("Dr. Alice Martin" NIL "alice.martin" "hopital.example")) '
        b'(("Dr. Alice Martin" NIL "alice.martin" "hopital.example")) '
        b'(("Bob" NIL "bob" "cabinet.example")(NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'(("=?utf-8?q?Chlo=C3=A9?=" NIL "chloe" "lab.example")) NIL '
        b'"<req-7@cabinet.example>" "<cr-1@hopital.example>")')


# Hand-checked: text body "Bonjour,\r\nvoir le compte rendu." is 10 + 21 = 31 octets on 2 lines;
# "JVBERi0xLjQK" is 12; the nested message is 27 + 34 + 18 + 26 + 2 + 6 = 113 octets on 6 lines,
# its body "Merci." 6 octets on 1 line (the CRLF before a boundary belongs to the boundary, RFC 2046 5.1.1).
EXPECTED_BODYSTRUCTURE = (
    b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 31 2 NIL NIL NIL NIL)'
    b'("APPLICATION" "PDF" ("NAME" "cr.pdf") NIL NIL "BASE64" 12 NIL ("ATTACHMENT" ("FILENAME" "cr.pdf")) "fr" NIL)'
    b'("MESSAGE" "RFC822" NIL NIL "original request" "7BIT" 113 '
    b'(NIL "Demande" ((NIL NIL "bob" "cabinet.example")) ((NIL NIL "bob" "cabinet.example")) '
    b'((NIL NIL "bob" "cabinet.example")) ((NIL NIL "alice.martin" "hopital.example")) NIL NIL NIL NIL) '
    b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 6 1 NIL NIL NIL NIL) 6 NIL NIL NIL NIL) '
    b'"MIXED" ("BOUNDARY" "frontier") NIL NIL NIL)')

EXPECTED_BODY = (
    b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 31 2)'
    b'("APPLICATION" "PDF" ("NAME" "cr.pdf") NIL NIL "BASE64" 12)'
    b'("MESSAGE" "RFC822" NIL NIL "original request" "7BIT" 113 '
    b'(NIL "Demande" ((NIL NIL "bob" "cabinet.example")) ((NIL NIL "bob" "cabinet.example")) '
    b'((NIL NIL "bob" "cabinet.example")) ((NIL NIL "alice.martin" "hopital.example")) NIL NIL NIL NIL) '
    b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 6 1) 6) "MIXED")')


def test_bodystructure_of_multipart_with_attachment_and_nested_message(multipart: MimePart) -> None:
    assert format_bodystructure(multipart) == EXPECTED_BODYSTRUCTURE


def test_bare_line_feeds_give_the_same_structure() -> None:
    """RFC 3501 2.3.4: sizes are counted on CRLF line ends, whatever the stored message used."""
    message = parse_message(MULTIPART.replace(b"\r\n", b"\n"))
    assert format_bodystructure(message) == EXPECTED_BODYSTRUCTURE
    assert format_envelope(message) == format_envelope(parse_message(MULTIPART))


def test_body_is_bodystructure_without_extension_data(multipart: MimePart) -> None:
    assert format_bodystructure(multipart, extensible=False) == EXPECTED_BODY


def test_sizes_agree_with_served_octets(multipart: MimePart) -> None:
    parts = multipart.children or []
    assert body_octets(parts[0]) == b"Bonjour,\r\nvoir le compte rendu."
    assert len(body_octets(parts[2])) == 113


def test_message_without_mime_headers_defaults_to_text_plain() -> None:
    """RFC 2045 5.2: no Content-Type means text/plain; charset=us-ascii; LF-only input counted as CRLF."""
    message = parse_message(b"Subject: hi\n\nline one\nline two\n")
    assert format_bodystructure(message) == \
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 20 2 NIL NIL NIL NIL)'
    assert format_envelope(message) == b'(NIL "hi" NIL NIL NIL NIL NIL NIL NIL NIL)'


def test_eight_bit_header_is_sent_as_literal() -> None:
    message = parse_message("Subject: café\r\nFrom: Zoé <z@x.example>\r\n\r\nx".encode())
    envelope = format_envelope(message)
    assert b"{5}\r\ncaf\xc3\xa9" in envelope
    assert b"(({4}\r\nZo\xc3\xa9 NIL \"z\" \"x.example\"))" in envelope


def test_addresses_with_quoted_names_routes_and_comments() -> None:
    value = ('"Martin, Alice (CHU)" <alice@chu.example>, <@relay.example:bob@b.example>,\r\n'
             " carol@c.example (Carol C.), dave")
    assert format_address_list(value) == (
        b'(("Martin, Alice (CHU)" NIL "alice" "chu.example")(NIL "@relay.example" "bob" "b.example")'
        b'(NIL NIL "carol" "c.example")(NIL NIL "dave" NIL))')
    assert format_address_list("") == b"NIL"


# --- capabilities ---------------------------------------------------------------------------


def test_capabilities_follow_the_connection_state() -> None:
    plain = compute_capabilities(ConnectionState())
    assert plain == ("IMAP4rev1", "STARTTLS", "LOGINDISABLED", "LITERAL+", "ID")
    tls = compute_capabilities(ConnectionState(tls=True))
    assert "AUTH=PLAIN" in tls and "SASL-IR" in tls and "AUTH=EXTERNAL" not in tls and "STARTTLS" not in tls
    assert "AUTH=EXTERNAL" in compute_capabilities(ConnectionState(tls=True, client_certificate=True))
    authenticated = compute_capabilities(ConnectionState(tls=True, authenticated=True))
    for name in ("IDLE", "UIDPLUS", "MOVE", "NAMESPACE", "ID", "ENABLE", "SPECIAL-USE", "UNSELECT", "LITERAL+",
                 "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "CONDSTORE", "QUOTA", "UTF8=ACCEPT", "ESEARCH"):
        assert name in authenticated
    assert "AUTH=PLAIN" not in authenticated and "LOGINDISABLED" not in authenticated


def test_capabilities_can_be_switched_off_by_name() -> None:
    state = ConnectionState(tls=True, authenticated=True)
    assert "CONDSTORE" not in compute_capabilities(state, disabled=["condstore"])
    assert unknown_names(["CONDSTORE", "X-NOPE"]) == ["X-NOPE"]


def _nested_multipart(depth: int) -> bytes:
    head, tail = b"", b""
    for level in range(depth):
        head += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
        tail = b"\r\n--b%d--\r\n" % level + tail
    return b"Subject: deep\r\n" + head + b"Content-Type: text/plain\r\n\r\nhi" + tail


@pytest.mark.parametrize("depth", [MAX_MIME_DEPTH + 1, 300, 2000])
def test_deep_mime_nesting_becomes_one_opaque_part(depth: int) -> None:
    """Hostile nesting must not end in RecursionError (the email package recurses per level)."""
    message = parse_message(_nested_multipart(depth))
    assert format_bodystructure(message).startswith(b'("TEXT" "PLAIN"')
    assert body_octets(message).startswith(b'--b0\r\nContent-Type: multipart/mixed; boundary="b1"')


def test_nesting_within_the_limit_is_kept() -> None:
    message = parse_message(_nested_multipart(MAX_MIME_DEPTH))
    assert format_bodystructure(message).count(b'"MIXED"') == MAX_MIME_DEPTH


def test_binary_undoes_the_transfer_encoding_or_says_unknown_cte() -> None:
    """RFC 3516 4.2: BINARY[part] is the decoded content; an encoding we cannot undo is NO [UNKNOWN-CTE]."""
    from gateway.imap.commands.content import binary_octets
    from gateway.imap.protocol.mime import find_part

    message = parse_message(
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\nSlZC\r\nRVJp\r\n--b\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9=\r\n!\r\n--b\r\n"
        b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\n--b--\r\n")
    parts = [part for number in (1, 2, 3) if (part := find_part(message, (number,))) is not None]
    assert len(parts) == 3
    assert binary_octets(parts[0]) == b"JVBERi"
    assert binary_octets(parts[1]) == "café!".encode()
    with pytest.raises(ImapNo) as caught:
        binary_octets(parts[2])
    assert caught.value.code == "UNKNOWN-CTE"
