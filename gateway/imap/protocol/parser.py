"""Turn an assembled command (``RawCommand``) into a typed ``Command``.

``parse_command`` reads the tag and the command name, then hands the rest to
one small parser per command, each following the RFC 3501 9 production named
in its docstring.  Every failure is an ``ImapError`` carrying the tag, so the
session can answer with ``error.response()``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway.imap.protocol import commands as c
from gateway.imap.protocol.dates import parse_date_time
from gateway.imap.protocol.errors import BadCommand, ImapError, ParseError
from gateway.imap.protocol.fetch import FetchAttribute, parse_fetch_attributes, parse_fetch_modifiers
from gateway.imap.protocol.flags import parse_flag_list, parse_flags_unparenthesised
from gateway.imap.protocol.mailbox_name import (
    decode_mailbox_octets, parse_list_mailbox, parse_mailbox,
)
from gateway.imap.protocol.primitives import (
    ATOM, MAX_MODSEQ, TAG, Buffer, decode_utf8, fail, is_literal_start, parse_astring,
    parse_astring_text, parse_atom, parse_char, parse_end, parse_keyword, parse_literal, parse_nstring,
    parse_number, parse_nz_number, parse_sp, parse_string, peek, try_keyword,
)
from gateway.imap.protocol.reader import RawCommand
from gateway.imap.protocol.search import parse_search_program
from gateway.imap.protocol.sequence import SequenceSet, parse_sequence_set


@dataclass(frozen=True)
class ParserOptions:
    """Session state that changes the grammar."""

    utf8: bool = False   # RFC 6855 3: UTF8=ACCEPT enabled, mailbox names are UTF-8


CommandParser = Callable[[str, Buffer, ParserOptions], c.Command]
_COMMAND_NAME = re.compile(rb"[A-Za-z]+")

# RFC 3501 6.3.10 status-att, RFC 7162 3.1.6 HIGHESTMODSEQ, RFC 8438 SIZE, RFC 9051 DELETED.
STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ",
                          "SIZE", "DELETED"})
# RFC 5258 3.1 selection options (+ SPECIAL-USE, RFC 6154).
LIST_SELECTION = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
# RFC 2971 3.3: at most 30 pairs, field names up to 30 octets, values up to 1024.
ID_MAX_PAIRS, ID_MAX_FIELD, ID_MAX_VALUE = 30, 30, 1024


# --- entry points -------------------------------------------------------------

def parse_command(raw: RawCommand | bytes, options: ParserOptions | None = None) -> c.Command:
    """One complete command (final CRLF removed) to its dataclass; ``ImapError`` otherwise."""
    data = raw.data if isinstance(raw, RawCommand) else raw
    options = options or ParserOptions()
    tag: str | None = None
    try:
        tag, rest = _parse_tag(memoryview(data))
        name, rest = _parse_command_name(parse_sp(rest))
        if name == "UID":
            return _parse_uid(tag, rest, options)
        parser = _COMMANDS.get(name)
        if parser is None:
            raise BadCommand(f"Unknown command {name[:20]}")
        return parser(tag, rest, options)
    except ImapError as error:
        if error.tag is None:
            error.tag = tag
        raise


def append_target(command_so_far: bytes, options: ParserOptions | None = None) -> str | None:
    """The mailbox of an APPEND waiting for "+" before its message literal, else None.

    Lets the session answer NO [TRYCREATE] or [OVERQUOTA] before the upload
    (RFC 3501 6.3.11, 7.5) from ``ContinuationRequest.command_so_far``.
    """
    options = options or ParserOptions()
    try:
        _, rest = _parse_tag(memoryview(command_so_far))
        name, rest = _parse_command_name(parse_sp(rest))
        if name != "APPEND":
            return None
        mailbox, _ = _mailbox_arg(rest, options)
    except ImapError:
        return None
    return mailbox


def parse_idle_done(line: bytes) -> None:
    """RFC 2177 3: the only thing a client may send while idling is ``DONE``."""
    if line.strip().upper() != b"DONE":
        raise BadCommand("Expected DONE")


def parse_sasl_response(line: bytes) -> bytes | None:
    """RFC 3501 6.2.2: a base64 line answering a SASL challenge; None when the client cancels with "*"."""
    if line == b"*":
        return None
    return _decode_base64(line)


# --- shared pieces --------------------------------------------------------------

def _parse_tag(buf: Buffer) -> tuple[str, Buffer]:
    match = TAG.match(buf)
    if match is None:
        raise ParseError("Missing or invalid tag")
    return match.group(0).decode("ascii"), buf[match.end():]


def _parse_command_name(buf: Buffer) -> tuple[str, Buffer]:
    match = _COMMAND_NAME.match(buf[:32])
    if match is None:
        raise fail("Expected a command name", buf)
    rest = buf[match.end():]
    if len(rest) and peek(rest) != b" ":
        raise fail("Invalid command name", buf)
    return match.group(0).decode("ascii").upper(), rest


def _decode_base64(octets: bytes) -> bytes:
    try:
        return base64.b64decode(octets, validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("Invalid base64") from None


def _mailbox_arg(rest: Buffer, options: ParserOptions) -> tuple[str, Buffer]:
    return parse_mailbox(parse_sp(rest), utf8=options.utf8)


def _no_arguments(cls: Callable[[str], c.Command]) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        parse_end(rest)
        return cls(tag)
    return parse


def _single_mailbox(cls: Callable[[str, str], c.Command]) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        mailbox, rest = _mailbox_arg(rest, options)
        parse_end(rest)
        return cls(tag, mailbox)
    return parse


# --- not authenticated ------------------------------------------------------------

def _authenticate(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 authenticate = "AUTHENTICATE" SP auth-type [SP (base64 / "=")] (RFC 4959 3)."""
    mechanism, rest = parse_atom(parse_sp(rest), ATOM)
    initial: bytes | None = None
    if len(rest):
        response, rest = parse_atom(parse_sp(rest), ATOM)
        initial = b"" if response == b"=" else _decode_base64(response)
    parse_end(rest)
    return c.Authenticate(tag, mechanism.decode("ascii").upper(), initial)


def _login(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 login = "LOGIN" SP userid SP password (both astring)."""
    username, rest = parse_astring_text(parse_sp(rest), "user name")
    password, rest = parse_astring_text(parse_sp(rest), "password")
    parse_end(rest)
    return c.Login(tag, username, password)


# --- authenticated ------------------------------------------------------------------

def _parse_qresync(buf: Buffer) -> tuple[c.QResyncParameters, Buffer]:
    """RFC 7162 3.2.5: "(" uidvalidity SP mod-sequence-value [SP known-uids] [SP seq-match-data] ")"."""
    rest = parse_char(buf, b"(")
    uid_validity, rest = parse_nz_number(rest)
    modseq, rest = parse_number(parse_sp(rest), MAX_MODSEQ)
    known_uids: SequenceSet | None = None
    match_data: tuple[SequenceSet, SequenceSet] | None = None
    if peek(rest) == b" " and peek(rest[1:]) != b"(":
        known_uids, rest = parse_sequence_set(parse_sp(rest), allow_saved=False)
    if peek(rest) == b" ":
        inner = parse_char(parse_sp(rest), b"(")
        sequences, inner = parse_sequence_set(inner, allow_saved=False)
        uids, inner = parse_sequence_set(parse_sp(inner), allow_saved=False)
        match_data, rest = (sequences, uids), parse_char(inner, b")")
    return c.QResyncParameters(uid_validity, modseq, known_uids, match_data), parse_char(rest, b")")


def _select(cls: type[c.Select]) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        """RFC 4466 2.1: select = "SELECT" SP mailbox [select-params]."""
        mailbox, rest = _mailbox_arg(rest, options)
        condstore = False
        qresync: c.QResyncParameters | None = None
        if len(rest):
            rest = parse_char(parse_sp(rest), b"(")
            while True:
                after = try_keyword(rest, b"QRESYNC")
                if after is not None:
                    qresync, rest = _parse_qresync(parse_sp(after))
                else:
                    rest = parse_keyword(rest, b"CONDSTORE")   # RFC 7162 3.1.8
                    condstore = True
                if peek(rest) == b")":
                    break
                rest = parse_sp(rest)
            rest = rest[1:]
        parse_end(rest)
        return cls(tag, mailbox, condstore, qresync)
    return parse


def _parse_use_attributes(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 6154 6: "USE" SP "(" [use-attr *(SP use-attr)] ")"; use-attr is "\\" atom."""
    rest = parse_char(parse_sp(parse_keyword(buf, b"USE")), b"(")
    attributes: list[str] = []
    while peek(rest) != b")":
        if attributes:
            rest = parse_sp(rest)
        rest = parse_char(rest, b"\\")
        atom, rest = parse_atom(rest, ATOM)
        attributes.append("\\" + atom.decode("ascii").capitalize())
    return tuple(attributes), rest[1:]


def _create(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 4466 2.2: create = "CREATE" SP mailbox [create-params]; RFC 6154 3 USE."""
    mailbox, rest = _mailbox_arg(rest, options)
    special_use: tuple[str, ...] = ()
    if len(rest):
        inner = parse_char(parse_sp(rest), b"(")
        special_use, inner = _parse_use_attributes(inner)
        rest = parse_char(inner, b")")
    parse_end(rest)
    return c.Create(tag, mailbox, special_use)


def _rename(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 rename = "RENAME" SP mailbox SP mailbox."""
    source, rest = _mailbox_arg(rest, options)
    destination, rest = _mailbox_arg(rest, options)
    parse_end(rest)
    return c.Rename(tag, source, destination)


def _parse_reference(buf: Buffer, options: ParserOptions) -> tuple[str, Buffer]:
    """The LIST reference is a ``mailbox`` but not INBOX-normalised (it is a prefix)."""
    octets, rest = parse_astring(buf)
    return decode_mailbox_octets(octets, utf8=options.utf8, pattern=True), rest


def _parse_options(buf: Buffer, allowed: frozenset[str], what: str) -> tuple[list[str], Buffer]:
    rest = parse_char(buf, b"(")
    chosen: list[str] = []
    while peek(rest) != b")":
        if chosen:
            rest = parse_sp(rest)
        atom, rest = parse_atom(rest, ATOM)
        option = atom.decode("ascii").upper()
        if option not in allowed:
            raise fail(f"Unknown {what} option", buf)
        chosen.append(option)
    return chosen, rest[1:]


def _parse_status_items(buf: Buffer) -> tuple[tuple[str, ...], Buffer]:
    """RFC 3501 9: "(" status-att *(SP status-att) ")"."""
    items, rest = _parse_options(buf, STATUS_ITEMS, "STATUS")
    if not items:
        raise fail("Empty STATUS item list", buf)
    return tuple(dict.fromkeys(items)), rest


def _parse_list_return(buf: Buffer) -> tuple[c.ListReturn, Buffer]:
    """RFC 5258 6: "RETURN" SP "(" [return-option *(SP return-option)] ")"; RFC 5819 STATUS."""
    rest = parse_char(parse_sp(parse_keyword(buf, b"RETURN")), b"(")
    flags: set[str] = set()
    status: tuple[str, ...] | None = None
    while peek(rest) != b")":
        if flags or status is not None:
            rest = parse_sp(rest)
        after = try_keyword(rest, b"STATUS")
        if after is not None:
            status, rest = _parse_status_items(parse_sp(after))
            continue
        atom, rest = parse_atom(rest, ATOM)
        option = atom.decode("ascii").upper()
        if option not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
            raise fail("Unknown LIST return option", buf)
        flags.add(option)
    returns = c.ListReturn("SUBSCRIBED" in flags, "CHILDREN" in flags, "SPECIAL-USE" in flags, status)
    return returns, rest[1:]


def _parse_patterns(buf: Buffer, options: ParserOptions) -> tuple[tuple[str, ...], bool, Buffer]:
    """RFC 5258 3: mbox-or-pat = list-mailbox / patterns; patterns = "(" list-mailbox *(SP ...) ")"."""
    if peek(buf) != b"(":
        pattern, rest = parse_list_mailbox(buf, utf8=options.utf8)
        return (pattern,), False, rest
    rest = buf[1:]
    patterns: list[str] = []
    while True:
        pattern, rest = parse_list_mailbox(rest, utf8=options.utf8)
        patterns.append(pattern)
        if peek(rest) == b")":
            return tuple(patterns), True, rest[1:]
        rest = parse_sp(rest)


def _list(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 5258 3: list = "LIST" [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]."""
    rest = parse_sp(rest)
    selection: list[str] = []
    extended = False
    if peek(rest) == b"(":
        selection, rest = _parse_options(rest, LIST_SELECTION, "LIST selection")
        rest, extended = parse_sp(rest), True
        if "RECURSIVEMATCH" in selection and set(selection) - {"REMOTE"} == {"RECURSIVEMATCH"}:
            # RFC 5258 3.1: RECURSIVEMATCH alone (or only with REMOTE) is a syntax error.
            raise ParseError("RECURSIVEMATCH needs another selection option")
    reference, rest = _parse_reference(rest, options)
    patterns, several, rest = _parse_patterns(parse_sp(rest), options)
    returns = c.ListReturn()
    if len(rest):
        returns, rest = _parse_list_return(parse_sp(rest))
        extended = True
    parse_end(rest)
    return c.List(tag, reference, patterns, frozenset(selection), returns, extended or several)


def _lsub(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 lsub = "LSUB" SP mailbox SP list-mailbox."""
    reference, rest = _parse_reference(parse_sp(rest), options)
    pattern, rest = parse_list_mailbox(parse_sp(rest), utf8=options.utf8)
    parse_end(rest)
    return c.Lsub(tag, reference, pattern)


def _status(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 status = "STATUS" SP mailbox SP "(" status-att *(SP status-att) ")"."""
    mailbox, rest = _mailbox_arg(rest, options)
    items, rest = _parse_status_items(parse_sp(rest))
    parse_end(rest)
    return c.Status(tag, mailbox, items)


def _append(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 append = "APPEND" SP mailbox [SP flag-list] [SP date-time] SP literal.

    RFC 3516 4.4: the literal may be a literal8; RFC 6855 4: or "UTF8" SP "(" literal8 ")".
    """
    mailbox, rest = _mailbox_arg(rest, options)
    rest = parse_sp(rest)
    flags: tuple[str, ...] = ()
    if peek(rest) == b"(":
        flags, rest = parse_flag_list(rest)
        rest = parse_sp(rest)
    internal_date = None
    if peek(rest) == b'"':
        internal_date, rest = parse_date_time(rest)
        rest = parse_sp(rest)
    utf8 = False
    after = try_keyword(rest, b"UTF8")
    if after is not None:
        utf8, rest = True, parse_char(parse_sp(after), b"(")
    if not is_literal_start(rest):
        raise fail("APPEND needs the message as a literal", rest)
    message, rest, binary = parse_literal(rest, allow_binary=True)
    if utf8:
        if not binary:
            raise fail("UTF8 APPEND needs a literal8", rest)
        rest = parse_char(rest, b")")
    parse_end(rest)
    return c.Append(tag, mailbox, flags, internal_date, message, binary, utf8)


def _parse_id_pair(buf: Buffer) -> tuple[tuple[str, str | None], Buffer]:
    name_octets, rest = parse_string(buf)
    value_octets, rest = parse_nstring(parse_sp(rest))
    if len(name_octets) > ID_MAX_FIELD or (value_octets is not None and len(value_octets) > ID_MAX_VALUE):
        raise fail("ID field or value too long", buf)
    name = decode_utf8(name_octets, "ID field")
    value = None if value_octets is None else decode_utf8(value_octets, "ID value")
    return (name, value), rest


def _id(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 2971 4: id = "ID" SP id-params-list; id-params-list = "(" *(string SP nstring) ")" / nil."""
    rest = parse_sp(rest)
    after_nil = try_keyword(rest, b"NIL")
    if after_nil is not None:
        parse_end(after_nil)
        return c.Id(tag, None)
    rest = parse_char(rest, b"(")
    pairs: list[tuple[str, str | None]] = []
    while peek(rest) != b")":
        if pairs:
            rest = parse_sp(rest)
        pair, rest = _parse_id_pair(rest)
        pairs.append(pair)
        if len(pairs) > ID_MAX_PAIRS:
            raise fail("Too many ID fields", rest)
    parse_end(rest[1:])
    return c.Id(tag, tuple(pairs))


def _enable(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 5161 4: enable = "ENABLE" 1*(SP capability)."""
    names: list[str] = []
    while len(rest) or not names:
        atom, rest = parse_atom(parse_sp(rest), ATOM)
        names.append(atom.decode("ascii").upper())
        if len(names) > 64:
            raise fail("Too many capabilities", rest)
    return c.Enable(tag, tuple(dict.fromkeys(names)))


def _getquota(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 9208 7: getquota = "GETQUOTA" SP quota-root-name (astring)."""
    root, rest = parse_astring_text(parse_sp(rest), "quota root")
    parse_end(rest)
    return c.GetQuota(tag, root)


def _parse_quota_limit(buf: Buffer) -> tuple[tuple[str, int], Buffer]:
    """RFC 9208 7: setquota-resource = resource-name SP resource-limit (number64)."""
    atom, rest = parse_atom(buf, ATOM)
    limit, rest = parse_number(parse_sp(rest), MAX_MODSEQ)
    return (atom.decode("ascii").upper(), limit), rest


def _setquota(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 9208 7: setquota = "SETQUOTA" SP quota-root-name SP setquota-list."""
    root, rest = parse_astring_text(parse_sp(rest), "quota root")
    rest = parse_char(parse_sp(rest), b"(")
    limits: list[tuple[str, int]] = []
    while peek(rest) != b")":
        if limits:
            rest = parse_sp(rest)
        limit, rest = _parse_quota_limit(rest)
        limits.append(limit)
        if len(limits) > 32:
            raise fail("Too many quota resources", rest)
    parse_end(rest[1:])
    return c.SetQuota(tag, root, tuple(limits))


# --- selected -------------------------------------------------------------------------

def _search(uid: bool) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        """RFC 3501 9 search; RFC 4731 3.1 search-return-opts."""
        program, rest = parse_search_program(parse_sp(rest))
        parse_end(rest)
        return c.Search(tag, program.criteria, program.charset, program.return_options, uid)
    return parse


def _fetch(uid: bool) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        """RFC 3501 9 fetch = "FETCH" SP sequence-set SP (macro / fetch-att / list) [fetch-modifiers]."""
        sequence_set, rest = parse_sequence_set(parse_sp(rest))
        attributes, rest = parse_fetch_attributes(parse_sp(rest))
        changed_since, vanished = None, False
        if len(rest):
            modifiers, rest = parse_fetch_modifiers(parse_sp(rest))
            changed_since, vanished = modifiers.changed_since, modifiers.vanished
            if vanished and not uid:
                raise ParseError("VANISHED is only allowed with UID FETCH")   # RFC 7162 3.2.6
        parse_end(rest)
        if uid and not any(item.name == "UID" for item in attributes):
            # RFC 3501 6.4.8: UID FETCH always returns the UID.
            attributes = (*attributes, FetchAttribute("UID"))
        return c.Fetch(tag, sequence_set, attributes, uid, changed_since, vanished)
    return parse


_STORE_ITEM = re.compile(rb"([+-]?)FLAGS(\.SILENT)?(?= )", re.IGNORECASE)


def _store(uid: bool) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        """RFC 3501 9 store = "STORE" SP sequence-set [store-modifiers] SP store-att-flags (RFC 7162 3.1.3)."""
        sequence_set, rest = parse_sequence_set(parse_sp(rest))
        rest = parse_sp(rest)
        unchanged_since = None
        if peek(rest) == b"(":
            inner = parse_sp(parse_keyword(rest[1:], b"UNCHANGEDSINCE"))
            unchanged_since, inner = parse_number(inner, MAX_MODSEQ)
            rest = parse_sp(parse_char(inner, b")"))
        match = _STORE_ITEM.match(rest)
        if match is None:
            raise fail("Expected FLAGS, +FLAGS or -FLAGS", rest)
        mode = c.StoreMode(match.group(1).decode())
        rest = parse_sp(rest[match.end():])
        if peek(rest) == b"(":
            flags, rest = parse_flag_list(rest)
        else:
            flags, rest = parse_flags_unparenthesised(rest)
        parse_end(rest)
        return c.Store(tag, sequence_set, mode, bool(match.group(2)), flags, uid, unchanged_since)
    return parse


def _copy_or_move(cls: type[c.Copy] | type[c.Move], uid: bool) -> CommandParser:
    def parse(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
        """RFC 3501 9 copy = "COPY" SP sequence-set SP mailbox; RFC 6851 3.1 move likewise."""
        sequence_set, rest = parse_sequence_set(parse_sp(rest))
        mailbox, rest = _mailbox_arg(rest, options)
        parse_end(rest)
        return cls(tag, sequence_set, mailbox, uid)
    return parse


def _uid_expunge(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 4315 3: uid-expunge = "UID" SP "EXPUNGE" SP sequence-set."""
    uid_set, rest = parse_sequence_set(parse_sp(rest))
    parse_end(rest)
    return c.Expunge(tag, uid_set)


def _parse_uid(tag: str, rest: Buffer, options: ParserOptions) -> c.Command:
    """RFC 3501 9 uid = "UID" SP (copy / fetch / search / store); RFC 4315 EXPUNGE; RFC 6851 MOVE."""
    name, rest = _parse_command_name(parse_sp(rest))
    parser = _UID_COMMANDS.get(name)
    if parser is None:
        raise BadCommand(f"Unknown UID command {name[:20]}")
    return parser(tag, rest, options)


_COMMANDS: dict[str, CommandParser] = {
    "CAPABILITY": _no_arguments(c.Capability),
    "NOOP": _no_arguments(c.Noop),
    "LOGOUT": _no_arguments(c.Logout),
    "STARTTLS": _no_arguments(c.StartTls),
    "AUTHENTICATE": _authenticate,
    "LOGIN": _login,
    "SELECT": _select(c.Select),
    "EXAMINE": _select(c.Examine),
    "CREATE": _create,
    "DELETE": _single_mailbox(c.Delete),
    "RENAME": _rename,
    "SUBSCRIBE": _single_mailbox(c.Subscribe),
    "UNSUBSCRIBE": _single_mailbox(c.Unsubscribe),
    "LIST": _list,
    "LSUB": _lsub,
    "STATUS": _status,
    "APPEND": _append,
    "CHECK": _no_arguments(c.Check),
    "CLOSE": _no_arguments(c.Close),
    "UNSELECT": _no_arguments(c.Unselect),
    "EXPUNGE": _no_arguments(c.Expunge),
    "SEARCH": _search(uid=False),
    "FETCH": _fetch(uid=False),
    "STORE": _store(uid=False),
    "COPY": _copy_or_move(c.Copy, uid=False),
    "MOVE": _copy_or_move(c.Move, uid=False),
    "IDLE": _no_arguments(c.Idle),
    "NAMESPACE": _no_arguments(c.Namespace),
    "ID": _id,
    "ENABLE": _enable,
    "GETQUOTA": _getquota,
    "GETQUOTAROOT": _single_mailbox(c.GetQuotaRoot),
    "SETQUOTA": _setquota,
}

_UID_COMMANDS: dict[str, CommandParser] = {
    "FETCH": _fetch(uid=True),
    "STORE": _store(uid=True),
    "COPY": _copy_or_move(c.Copy, uid=True),
    "MOVE": _copy_or_move(c.Move, uid=True),
    "SEARCH": _search(uid=True),
    "EXPUNGE": _uid_expunge,
}

COMMAND_NAMES = frozenset(_COMMANDS)
