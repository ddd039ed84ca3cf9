"""Wire line → typed command, from the examples of RFC 3501 (sections 6 and 8) and the extension RFCs."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.imap.protocol import commands as c
from gateway.imap.protocol.errors import BadCommand, ImapError, ImapNo, ParseError
from gateway.imap.protocol.fetch import BodySection, FetchAttribute
from gateway.imap.protocol.parser import (
    ParserOptions, append_target, parse_command, parse_idle_done, parse_sasl_response,
)
from gateway.imap.protocol.reader import ReaderLimits
from gateway.imap.protocol.search import (
    SearchAll, SearchAnd, SearchDate, SearchFlag, SearchHeader, SearchModSeq, SearchNot, SearchSequence,
    SearchText,
)
from gateway.imap.protocol.sequence import SequenceRange, SequenceSet

S = SequenceSet.of
STAR = None
F = FetchAttribute
FLAGS, UID = F("FLAGS"), F("UID")
ALL_ITEMS = (F("FLAGS"), F("INTERNALDATE"), F("RFC822.SIZE"), F("ENVELOPE"))
PDT = dt.timezone(dt.timedelta(hours=-8))

RFC3501_EXAMPLES: list[tuple[bytes, c.Command]] = [
    # RFC 3501 8: sample IMAP4rev1 connection
    (b"a001 login mrc secret", c.Login("a001", "mrc", "secret")),
    (b"a002 select inbox", c.Select("a002", "INBOX")),
    (b"a003 fetch 12 full", c.Fetch("a003", S(12), (*ALL_ITEMS, F("BODY")))),
    (b"a004 fetch 12 body[header]", c.Fetch("a004", S(12), (F("BODY", BodySection(text="HEADER")),))),
    (b"a005 store 12 +flags \\deleted", c.Store("a005", S(12), c.StoreMode.ADD, False, ("\\Deleted",))),
    (b"a006 logout", c.Logout("a006")),
    # RFC 3501 6.1 - 6.4 examples
    (b"abcd CAPABILITY", c.Capability("abcd")),
    (b"a002 NOOP", c.Noop("a002")),
    (b"a002 STARTTLS", c.StartTls("a002")),
    (b"A001 AUTHENTICATE GSSAPI", c.Authenticate("A001", "GSSAPI")),
    (b"a001 LOGIN SMITH SESAME", c.Login("a001", "SMITH", "SESAME")),
    (b"A142 SELECT INBOX", c.Select("A142", "INBOX")),
    (b"A932 EXAMINE blurdybloop", c.Examine("A932", "blurdybloop")),
    (b"A003 CREATE owatagusiam/", c.Create("A003", "owatagusiam/")),
    (b"A683 DELETE blurdybloop", c.Delete("A683", "blurdybloop")),
    (b"A683 RENAME blurdybloop sarasoop", c.Rename("A683", "blurdybloop", "sarasoop")),
    (b"A002 SUBSCRIBE #news.comp.mail.mime", c.Subscribe("A002", "#news.comp.mail.mime")),
    (b"A002 UNSUBSCRIBE #news.comp.mail.mime", c.Unsubscribe("A002", "#news.comp.mail.mime")),
    (b'A101 LIST "" ""', c.List("A101", "", ("",))),
    (b'A102 LIST #news.comp.mail.misc ""', c.List("A102", "#news.comp.mail.misc", ("",))),
    (b"A202 LIST ~/Mail/ %", c.List("A202", "~/Mail/", ("%",))),
    (b'A002 LSUB "#news." "comp.mail.*"', c.Lsub("A002", "#news.", "comp.mail.*")),
    (b"A042 STATUS blurdybloop (UIDNEXT MESSAGES)", c.Status("A042", "blurdybloop", ("UIDNEXT", "MESSAGES"))),
    (b'A003 APPEND saved-messages (\\Seen) " 7-Feb-1994 21:52:25 -0800" {11}\r\nDate: x\r\n\r\n',
     c.Append("A003", "saved-messages", ("\\Seen",), dt.datetime(1994, 2, 7, 21, 52, 25, tzinfo=PDT),
              b"Date: x\r\n\r\n")),
    (b"FXXZ CHECK", c.Check("FXXZ")),
    (b"A341 CLOSE", c.Close("A341")),
    (b"A202 EXPUNGE", c.Expunge("A202")),
    (b'A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"',
     c.Search("A282", SearchAnd((SearchFlag("\\Flagged"), SearchDate("internal", "since", dt.date(1994, 2, 1)),
                                 SearchNot(SearchHeader("from", "Smith")))))),
    (b'A283 SEARCH TEXT "string not in mailbox"', c.Search("A283", SearchText("text", "string not in mailbox"))),
    (b"A284 SEARCH CHARSET UTF-8 TEXT {6}\r\nXXXXXX", c.Search("A284", SearchText("text", "XXXXXX"), "UTF-8")),
    (b"A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])",
     c.Fetch("A654", S((2, 4)), (FLAGS, F("BODY", BodySection(text="HEADER.FIELDS", fields=("DATE", "FROM")))))),
    (b"A003 STORE 2:4 +FLAGS (\\Deleted)", c.Store("A003", S((2, 4)), c.StoreMode.ADD, False, ("\\Deleted",))),
    (b"A003 COPY 2:4 MEETING", c.Copy("A003", S((2, 4)), "MEETING")),
    (b"A999 UID FETCH 4827313:4828442 FLAGS", c.Fetch("A999", S((4827313, 4828442)), (FLAGS, UID), uid=True)),
    (b"A023 LOGOUT", c.Logout("A023")),
]

EXTENSION_EXAMPLES: list[tuple[bytes, c.Command]] = [
    # RFC 2177 IDLE, RFC 3691 UNSELECT, RFC 2342 NAMESPACE
    (b"A002 IDLE", c.Idle("A002")),
    (b"A341 UNSELECT", c.Unselect("A341")),
    (b"A001 NAMESPACE", c.Namespace("A001")),
    # RFC 4959 SASL-IR
    (b"a01 AUTHENTICATE PLAIN dGVzdAB0ZXN0AHRlc3Q=", c.Authenticate("a01", "PLAIN", b"test\x00test\x00test")),
    (b"a02 AUTHENTICATE EXTERNAL =", c.Authenticate("a02", "EXTERNAL", b"")),
    # RFC 7888 LITERAL+
    (b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man", c.Login("A001", "FRED FOOBAR", "fat man")),
    # RFC 4315 UIDPLUS, RFC 6851 MOVE
    (b"A003 UID EXPUNGE 3000:3002", c.Expunge("A003", S((3000, 3002)))),
    (b"a UID MOVE 42:69 foo", c.Move("a", S((42, 69)), "foo", uid=True)),
    (b"a MOVE 2:* Trash", c.Move("a", SequenceSet((SequenceRange(2, STAR),)), "Trash")),
    (b"a UID COPY 1,3 Archive", c.Copy("a", S(1, 3), "Archive", uid=True)),
    # RFC 7162 CONDSTORE / QRESYNC
    (b"a103 SELECT INBOX (CONDSTORE)", c.Select("a103", "INBOX", condstore=True)),
    (b"s100 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)",
     c.Fetch("s100", SequenceSet((SequenceRange(1, STAR),)), (FLAGS, UID), True, 12345)),
    (b"a103 UID STORE 6,4,8 (UNCHANGEDSINCE 12121230045) +FLAGS.SILENT (\\Deleted)",
     c.Store("a103", S(6, 4, 8), c.StoreMode.ADD, True, ("\\Deleted",), True, 12121230045)),
    (b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338',
     c.Search("a", SearchModSeq(620162338, "/flags/\\draft", "all"))),
    (b"a SEARCH MODSEQ 620162338", c.Search("a", SearchModSeq(620162338))),
    (b"A02 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
     c.Select("A02", "INBOX", qresync=c.QResyncParameters(67890007, 20050715194045000,
                                                          S(41, (43, 211), (214, 541))))),
    (b"B04 SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500 15000,22500)))",
     c.Select("B04", "INBOX", qresync=c.QResyncParameters(67890007, 90060115194045000, S((1, 29997)),
                                                          (S(5000, 7500), S(15000, 22500))))),
    (b"A03 UID FETCH 1:* FLAGS (CHANGEDSINCE 1 VANISHED)",
     c.Fetch("A03", SequenceSet((SequenceRange(1, STAR),)), (FLAGS, UID), True, 1, True)),
    # RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS, RFC 6154 SPECIAL-USE
    (b'A01 LIST "" ("INBOX" "Drafts" "Sent/%")', c.List("A01", "", ("INBOX", "Drafts", "Sent/%"), extended=True)),
    (b'A02 LIST (SUBSCRIBED) "" "*"', c.List("A02", "", ("*",), frozenset({"SUBSCRIBED"}), extended=True)),
    (b'A03 LIST () "" "%" RETURN (CHILDREN)',
     c.List("A03", "", ("%",), returns=c.ListReturn(children=True), extended=True)),
    (b'A05 LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)',
     c.List("A05", "", ("%",), frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}), c.ListReturn(children=True), True)),
    (b'A01 LIST "" % RETURN (STATUS (MESSAGES UNSEEN))',
     c.List("A01", "", ("%",), returns=c.ListReturn(status=("MESSAGES", "UNSEEN")), extended=True)),
    (b't1 LIST "" "%" RETURN (SPECIAL-USE)', c.List("t1", "", ("%",), returns=c.ListReturn(special_use=True),
                                                   extended=True)),
    (b't1 LIST (SPECIAL-USE) "" "*"', c.List("t1", "", ("*",), frozenset({"SPECIAL-USE"}), extended=True)),
    (b"t3 CREATE MySpecial (USE (\\Drafts \\Sent))", c.Create("t3", "MySpecial", ("\\Drafts", "\\Sent"))),
    # RFC 2971 ID
    (b'a023 ID ("name" "sodr" "version" "19.34" "vendor" "Pink Floyd Music Limited")',
     c.Id("a023", (("name", "sodr"), ("version", "19.34"), ("vendor", "Pink Floyd Music Limited")))),
    (b"a024 ID NIL", c.Id("a024", None)),
    (b'a025 ID ("os" NIL)', c.Id("a025", (("os", None),))),
    # RFC 5161 ENABLE
    (b"t2 ENABLE CONDSTORE X-GOOD-IDEA", c.Enable("t2", ("CONDSTORE", "X-GOOD-IDEA"))),
    # RFC 9208 QUOTA
    (b'G0001 GETQUOTA "!partition.sda4"', c.GetQuota("G0001", "!partition.sda4")),
    (b"A003 GETQUOTAROOT INBOX", c.GetQuotaRoot("A003", "INBOX")),
    (b'S0000 SETQUOTA "#user/alice" (STORAGE 510)', c.SetQuota("S0000", "#user/alice", (("STORAGE", 510),))),
    # RFC 4731 ESEARCH, RFC 5182 SEARCHRES
    (b'A282 SEARCH RETURN (MIN COUNT) FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"',
     c.Search("A282", SearchAnd((SearchFlag("\\Flagged"), SearchDate("internal", "since", dt.date(1994, 2, 1)),
                                 SearchNot(SearchHeader("from", "Smith")))), None, ("MIN", "COUNT"))),
    (b"A283 SEARCH RETURN () FLAGGED", c.Search("A283", SearchFlag("\\Flagged"), None, ("ALL",))),
    (b"A284 UID SEARCH RETURN (SAVE) UNSEEN", c.Search("A284", SearchFlag("\\Seen", False), None, ("SAVE",), True)),
    (b"A285 FETCH $ (FLAGS)", c.Fetch("A285", SequenceSet(saved=True), (FLAGS,))),
    (b"A286 SEARCH $ ALL", c.Search("A286", SearchAnd((SearchSequence(SequenceSet(saved=True)), SearchAll())))),
    # RFC 3516 BINARY, RFC 6855 UTF8 APPEND
    (b"t1 FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[2])",
     c.Fetch("t1", S(1), (F("BINARY", BodySection((1,)), None, True), F("BINARY.SIZE", BodySection((2,)))))),
    (b"A003 APPEND Drafts (\\Seen $MDNSent) ~{5}\r\nhe\x00lo",
     c.Append("A003", "Drafts", ("\\Seen", "$MDNSent"), None, b"he\x00lo", binary=True)),
    (b"A004 APPEND INBOX UTF8 (~{5}\r\nhello)", c.Append("A004", "INBOX", (), None, b"hello", True, True)),
]


@pytest.mark.parametrize(("wire", "expected"), RFC3501_EXAMPLES + EXTENSION_EXAMPLES,
                         ids=[w[:40].decode("latin-1") for w, _ in RFC3501_EXAMPLES + EXTENSION_EXAMPLES])
def test_examples_parse_to_their_command(wire: bytes, expected: c.Command) -> None:
    assert parse_command(wire) == expected


FETCH_ITEMS: list[tuple[bytes, tuple[FetchAttribute, ...]]] = [
    (b"ALL", ALL_ITEMS),
    (b"FAST", (F("FLAGS"), F("INTERNALDATE"), F("RFC822.SIZE"))),
    (b"(ENVELOPE BODYSTRUCTURE BODY UID MODSEQ INTERNALDATE)",
     (F("ENVELOPE"), F("BODYSTRUCTURE"), F("BODY"), F("UID"), F("MODSEQ"), F("INTERNALDATE"))),
    (b"(RFC822 RFC822.HEADER RFC822.SIZE RFC822.TEXT)",
     (F("RFC822"), F("RFC822.HEADER"), F("RFC822.SIZE"), F("RFC822.TEXT"))),
    (b"BODY[]", (F("BODY", BodySection()),)),
    (b"BODY.PEEK[]<0.2048>", (F("BODY", BodySection(), (0, 2048), True),)),
    (b"BODY[1.2.3]", (F("BODY", BodySection((1, 2, 3))),)),
    (b"BODY[1.2.MIME]", (F("BODY", BodySection((1, 2), "MIME")),)),
    (b"BODY[2.TEXT]", (F("BODY", BodySection((2,), "TEXT")),)),
    (b"BODY[TEXT]<100.50>", (F("BODY", BodySection(text="TEXT"), (100, 50)),)),
    (b"BODY.PEEK[HEADER.FIELDS.NOT (Received \"X-Spam\")]",
     (F("BODY", BodySection(text="HEADER.FIELDS.NOT", fields=("Received", "X-Spam")), None, True),)),
    (b"BODY[3.HEADER.FIELDS (SUBJECT)]", (F("BODY", BodySection((3,), "HEADER.FIELDS", ("SUBJECT",))),)),
]


@pytest.mark.parametrize(("items", "expected"), FETCH_ITEMS)
def test_fetch_items(items: bytes, expected: tuple[FetchAttribute, ...]) -> None:
    command = parse_command(b"f1 FETCH 1 " + items)
    assert isinstance(command, c.Fetch)
    assert command.attributes == expected


def test_fetch_response_names_drop_peek_and_keep_origin() -> None:
    """RFC 3501 7.4.2: BODY[section]<origin>; .PEEK never appears in responses."""
    peek = F("BODY", BodySection((1,), "HEADER.FIELDS", ("From", "To")), (0, 100), True)
    assert peek.response_name() == "BODY[1.HEADER.FIELDS (From To)]<0>"
    assert peek.request_name() == "BODY.PEEK[1.HEADER.FIELDS (From To)]<0.100>"
    assert not peek.sets_seen()
    assert F("BODY", BodySection()).sets_seen()
    assert F("RFC822.TEXT").sets_seen() and not F("RFC822.HEADER").sets_seen()


STORE_FORMS = [
    (b"FLAGS (\\Seen)", c.StoreMode.REPLACE, False, ("\\Seen",)),
    (b"FLAGS.SILENT ()", c.StoreMode.REPLACE, True, ()),
    (b"-FLAGS \\Seen \\Flagged", c.StoreMode.REMOVE, False, ("\\Seen", "\\Flagged")),
    (b"+flags.silent ($Forwarded Junk)", c.StoreMode.ADD, True, ("$Forwarded", "Junk")),
]


@pytest.mark.parametrize(("item", "mode", "silent", "flags"), STORE_FORMS)
def test_store_forms(item: bytes, mode: c.StoreMode, silent: bool, flags: tuple[str, ...]) -> None:
    command = parse_command(b"s STORE 1:3 " + item)
    assert command == c.Store("s", S((1, 3)), mode, silent, flags)


def test_command_names_and_keywords_are_case_insensitive() -> None:
    """RFC 3501 9: keywords are case-insensitive; INBOX too (RFC 3501 5.1)."""
    assert parse_command(b"x sElEcT iNbOx") == c.Select("x", "INBOX")
    assert parse_command(b"x uid fetch 1 (flags)") == c.Fetch("x", S(1), (FLAGS, UID), uid=True)


def test_modified_utf7_mailbox_names_are_decoded() -> None:
    """RFC 3501 5.1.3 example: ~peter/mail/台北/日本語."""
    command = parse_command(b"a CREATE ~peter/mail/&U,BTFw-/&ZeVnLIqe-")
    assert command == c.Create("a", "~peter/mail/台北/日本語")


def test_utf8_names_when_enabled() -> None:
    """RFC 6855 3: after ENABLE UTF8=ACCEPT names are UTF-8 (here quoted)."""
    wire = 'a SELECT "Éléments envoyés"'.encode()
    assert parse_command(wire, ParserOptions(utf8=True)) == c.Select("a", "Éléments envoyés")
    with pytest.raises(ParseError):
        parse_command(wire)


def test_sasl_and_idle_lines() -> None:
    assert parse_sasl_response(b"*") is None
    assert parse_sasl_response(b"AGZyZWQAcHc=") == b"\x00fred\x00pw"
    assert parse_sasl_response(b"") == b""
    parse_idle_done(b"done")
    with pytest.raises(ImapError):
        parse_idle_done(b"a NOOP")
    with pytest.raises(ParseError):
        parse_sasl_response(b"not base64!")


def test_unsupported_charset_is_no_badcharset() -> None:
    """RFC 3501 6.4.4: NO [BADCHARSET], tagged with the command's tag."""
    with pytest.raises(ImapNo) as caught:
        parse_command(b"t SEARCH CHARSET KOI8-R TEXT x")
    assert caught.value.response() == b"t NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset\r\n"


BAD_COMMANDS = [
    b"",                                    # no tag
    b"+tag NOOP",                           # tag may not contain "+"
    b"a",                                   # no command
    b"a FROBNICATE",                        # unknown command
    b"a NOOP extra",                        # trailing data
    b"a  NOOP",                             # two spaces
    b"a SELECT",                            # missing mailbox
    b"a FETCH 0 FLAGS",                     # 0 is not a sequence number
    b"a FETCH 1 (FLAGS",                    # unterminated list
    b"a FETCH 1 BODY[1.0]",                 # part numbers are non-zero
    b"a FETCH 1 BODY[MIME]",                # MIME needs a part
    b"a FETCH 1 BODY[]<0.0>",               # length is nz-number
    b"a FETCH 1 FLAGS (VANISHED)",          # RFC 7162 3.2.6: VANISHED needs CHANGEDSINCE and UID FETCH
    b"a FETCH 1 FLAGS (CHANGEDSINCE 1 VANISHED)",
    b"a STORE 1 +FLAGS (\\Recent)",          # \Recent is not settable
    b"a STORE 1 FROBS (\\Seen)",
    b"a SEARCH",                            # criteria required
    b"a SEARCH FROBNICATED",
    b"a SEARCH OR SEEN",                    # OR needs two keys
    b"a SEARCH SINCE 31-Feb-2020",          # no such date
    b"a SEARCH SINCE 1-Foo-2020",
    b"a APPEND INBOX",                      # no message literal
    b"a APPEND INBOX \"bad date\" {1}\r\nx",
    b"a LIST (RECURSIVEMATCH) \"\" *",      # RFC 5258 3.1
    b"a LIST \"\" * RETURN (FROB)",
    b"a STATUS INBOX ()",
    b"a STATUS INBOX (FROB)",
    b"a UID FROB 1",
    b"a UID EXPUNGE",
    b"a ENABLE",
    b"a AUTHENTICATE PLAIN !!!",
    b"a LOGIN \"unterminated",
    b"a LOGIN \"a\\x\" b",                   # bad escape in quoted string
    b"a CREATE caf\xc3\xa9",                # 8-bit name without UTF8=ACCEPT
    b"a SELECT {3}\r\na\x00b",              # NUL in literal
    b"a ID (\"name\")",
    b"a SETQUOTA \"\" (STORAGE)",
    b"a SELECT INBOX (FROB)",
    b"a FETCH 99999999999 FLAGS",           # beyond 32 bits
]


@pytest.mark.parametrize("wire", BAD_COMMANDS, ids=[w.decode("latin-1")[:40] for w in BAD_COMMANDS])
def test_malformed_commands_are_bad_with_a_reason(wire: bytes) -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(wire)
    response = caught.value.response()
    assert response.endswith(b"\r\n") and b" BAD " in response
    assert response.count(b"\r\n") == 1


INVALID_NAMES = [
    b"a CREATE &Jjo!",                      # bad modified UTF-7
    b"a CREATE A&AEE-",                     # "A" encoded: not canonical
    b"a SELECT \"x&\"",                     # unterminated
    b"a RENAME INBOX/a \"b\x01\"",            # a control character in a quoted string
]


@pytest.mark.parametrize("wire", INVALID_NAMES, ids=[w.decode("latin-1")[:40] for w in INVALID_NAMES])
def test_invalid_mailbox_names_are_no_not_bad(wire: bytes) -> None:
    """The command is well formed; the name cannot exist: NO [CANNOT] (RFC 3501 7.1.2, RFC 5530 3)."""
    with pytest.raises(ImapNo) as caught:
        parse_command(wire)
    assert caught.value.response().startswith(b"a NO [CANNOT] ")


def test_error_carries_the_tag_or_is_untagged() -> None:
    with pytest.raises(ParseError) as caught:
        parse_command(b"a17 FETCH 1 (FLAGS")
    assert caught.value.response().startswith(b"a17 BAD ")
    with pytest.raises(ParseError) as untagged:
        parse_command(b"(((")
    assert untagged.value.response().startswith(b"* BAD ")


def test_long_uid_sets_from_clients_fit() -> None:
    """Clients mark thousands of messages at once with a long UID set on one line."""
    uids = ",".join(str(n) for n in range(100_000, 108_000, 2))
    wire = f"t1 UID STORE {uids} +FLAGS.SILENT (\\Seen)".encode()
    assert len(wire) < ReaderLimits().max_line_length
    command = parse_command(wire)
    assert isinstance(command, c.Store) and len(command.sequence_set.ranges) == 4000


@pytest.mark.parametrize(("prefix", "mailbox"), [
    (b"a1 APPEND Drafts (\\Seen) {310}\r\n", "Drafts"),
    (b'a2 append "Envoy&AOk-s" {1}\r\n', "Envoyés"),
    (b"a3 APPEND {6}\r\n", None),                 # the literal announced is the mailbox name itself
    (b"a4 LOGIN {3}\r\n", None),
])
def test_append_target_before_the_upload(prefix: bytes, mailbox: str | None) -> None:
    assert append_target(prefix) == mailbox
