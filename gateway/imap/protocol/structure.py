"""ENVELOPE and BODY/BODYSTRUCTURE from a parsed message (RFC 3501 7.4.2, 9 ``envelope``, ``body``).

Input is an ``email.message.Message`` (``EmailMessage`` included), parsed from
the stored bytes.  Header content is served raw (encoded-words untouched).
Sizes and line counts are those of the octets ``body_octets`` returns, with
CRLF line ends as IMAP requires (RFC 3501 2.3.4 / 6.4.5); the session must
serve BODY[section] from the same function so the numbers agree.
"""

from __future__ import annotations

import io
import re
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Policy, compat32, default

from gateway.imap.protocol.headers import ImapAddress, MimeValue, parse_address_list, parse_mime_value, unfold
from gateway.imap.protocol.response import NIL, nstring, paren_list, string, to_octets

_LINE_END = re.compile(rb"\r\n|\r|\n")
_WIRE_POLICY = compat32.clone(linesep="\r\n", max_line_length=0)
_ENVELOPE_ADDRESSES = ("From", "Sender", "Reply-To", "To", "Cc", "Bcc")
# Deeper MIME nesting is shown as an opaque part: no client needs it, and
# hostile messages must not exhaust the stack.
MAX_MIME_DEPTH = 64
_OPAQUE = MimeValue("APPLICATION/OCTET-STREAM", ())


def mime_depth(message: Message) -> int:
    """How deeply parts nest (0 for a single part), computed without recursion."""
    deepest = 0
    pending: list[tuple[Message, int]] = [(message, 0)]
    while pending:
        part, depth = pending.pop()
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in _children(part))
    return deepest


def parse_message(data: bytes, policy: Policy = default) -> Message:
    """Parse stored octets for ENVELOPE, BODYSTRUCTURE and BODY[section].

    A message nested deeper than MAX_MIME_DEPTH (or too deep for the email
    package) is parsed headers-only: its body becomes one opaque part, because
    the email package's parser and generator recurse per level and hostile
    nesting would otherwise end in RecursionError.
    """
    try:
        message = BytesParser(policy=policy).parsebytes(data)
    except RecursionError:
        message = None
    if message is None or mime_depth(message) > MAX_MIME_DEPTH:
        return BytesParser(policy=policy).parsebytes(data, headersonly=True)
    return message


# --- raw header access -----------------------------------------------------------

def header_value(message: Message, name: str) -> str | None:
    """The first ``name`` header, unfolded, exactly as written (no RFC 2047 decoding)."""
    wanted = name.lower()
    for key, value in message.raw_items():
        if key.lower() == wanted:
            return unfold(str(value)).strip(" \t")
    return None


# --- ENVELOPE ---------------------------------------------------------------------------

def _format_address(address: ImapAddress, utf8: bool) -> bytes:
    return paren_list(nstring(part, utf8=utf8) for part in
                      (address.name, address.adl, address.mailbox, address.host))


def format_address_list(value: str | None, *, utf8: bool = False) -> bytes:
    """RFC 3501 9: env-from etc. = "(" 1*address ")" / nil."""
    addresses = parse_address_list(value) if value else []
    if not addresses:
        return NIL
    return b"(" + b"".join(_format_address(address, utf8) for address in addresses) + b")"


def format_envelope(message: Message, *, utf8: bool = False) -> bytes:
    """RFC 3501 7.4.2 ENVELOPE: date subject from sender reply-to to cc bcc in-reply-to message-id.

    Sender and Reply-To default to From when absent or empty (RFC 3501 7.4.2).
    """
    values = {name: header_value(message, name) for name in _ENVELOPE_ADDRESSES}
    for name in ("Sender", "Reply-To"):
        if not values[name] or format_address_list(values[name]) == NIL:
            values[name] = values["From"]
    fields = [
        nstring(header_value(message, "Date"), utf8=utf8),
        nstring(header_value(message, "Subject"), utf8=utf8),
        *(format_address_list(values[name], utf8=utf8) for name in _ENVELOPE_ADDRESSES),
        nstring(header_value(message, "In-Reply-To"), utf8=utf8),
        nstring(header_value(message, "Message-ID"), utf8=utf8),
    ]
    return paren_list(fields)


# --- body octets -------------------------------------------------------------------------

def _crlf(octets: bytes) -> bytes:
    return _LINE_END.sub(b"\r\n", octets)


def message_octets(message: Message) -> bytes:
    """A whole (possibly nested) message with CRLF line ends, headers as written."""
    buffer = io.BytesIO()
    BytesGenerator(buffer, mangle_from_=False, policy=_WIRE_POLICY).flatten(message, linesep="\r\n")
    return _crlf(buffer.getvalue())


def _split_header(octets: bytes) -> tuple[bytes, bytes]:
    """RFC 5322 2.1: the header ends at the first empty line (kept with the header, as BODY[HEADER] does)."""
    index = octets.find(b"\r\n\r\n")
    if index < 0:
        return octets, b""
    return octets[:index + 4], octets[index + 4:]


def _children(part: Message) -> list[Message]:
    payload = part.get_payload()
    return [child for child in payload if isinstance(child, Message)] if isinstance(payload, list) else []


def header_octets(part: Message) -> bytes:
    """The header of a message or part as written, CRLF line ends, blank line included (BODY[HEADER]/[MIME])."""
    return _split_header(message_octets(part))[0]


def body_octets(part: Message) -> bytes:
    """The body of a part as transferred (still content-transfer-encoded), CRLF line ends.

    A message/rfc822 body is the nested message; a multipart body keeps its
    boundaries, preamble and epilogue (RFC 2046 5.1.1).
    """
    payload = part.get_payload()
    if isinstance(payload, list):
        children = _children(part)
        if _is_rfc822(part) and children:
            return message_octets(children[0])
        return _split_header(message_octets(part))[1]
    return _crlf(to_octets(payload if isinstance(payload, (str, bytes)) else ""))


def _line_count(octets: bytes) -> int:
    """RFC 3501 9 body-fld-lines: text lines, a last line without its line end included."""
    partial_last = 1 if octets and not octets.endswith(b"\n") else 0
    return octets.count(b"\n") + partial_last


# --- BODYSTRUCTURE ---------------------------------------------------------------------

def _content_type(part: Message) -> MimeValue:
    """RFC 2045 5.2: absent or invalid Content-Type means the default (text/plain; charset=us-ascii,
    or message/rfc822 inside multipart/digest, RFC 2046 5.1.5)."""
    raw = header_value(part, "Content-Type")
    parsed = parse_mime_value(raw) if raw else None
    if parsed is None or parsed.value.count("/") != 1 or "" in parsed.value.split("/"):
        if part.get_default_type() == "message/rfc822":
            return MimeValue("MESSAGE/RFC822", ())
        return MimeValue("TEXT/PLAIN", (("CHARSET", "US-ASCII"),))
    return parsed


def _is_rfc822(part: Message) -> bool:
    return _content_type(part).value.lower() == "message/rfc822" and part.is_multipart()


def _parameters(parameters: tuple[tuple[str, str], ...], utf8: bool) -> bytes:
    """RFC 3501 9 body-fld-param = "(" string SP string *(SP string SP string) ")" / nil."""
    if not parameters:
        return NIL
    return paren_list(string(name.upper()) + b" " + string(value, utf8=utf8) for name, value in parameters)


def _disposition(part: Message, utf8: bool) -> bytes:
    """RFC 3501 9 body-fld-dsp = "(" string SP body-fld-param ")" / nil (RFC 2183)."""
    raw = header_value(part, "Content-Disposition")
    if not raw:
        return NIL
    parsed = parse_mime_value(raw)
    if not parsed.value:
        return NIL
    return b"(" + string(parsed.value.upper()) + b" " + _parameters(parsed.parameters, utf8) + b")"


def _language(part: Message) -> bytes:
    """RFC 3501 9 body-fld-lang = nstring / "(" string *(SP string) ")" (RFC 3282 Content-Language)."""
    raw = header_value(part, "Content-Language")
    tags = [tag.strip() for tag in (raw or "").split(",") if tag.strip()]
    if not tags:
        return NIL
    return string(tags[0]) if len(tags) == 1 else paren_list(string(tag) for tag in tags)


def _extension_tail(part: Message, utf8: bool) -> list[bytes]:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc (RFC 3501 9, RFC 2557 Content-Location)."""
    return [_disposition(part, utf8), _language(part), nstring(header_value(part, "Content-Location"), utf8=utf8)]


def _basic_fields(part: Message, media: MimeValue, octets: bytes, utf8: bool) -> list[bytes]:
    """RFC 3501 9 body-fields = body-fld-param SP body-fld-id SP body-fld-desc SP body-fld-enc SP body-fld-octets."""
    main, sub = media.value.split("/")
    encoding = (header_value(part, "Content-Transfer-Encoding") or "7BIT").strip().upper() or "7BIT"
    return [
        string(main.upper()), string(sub.upper()),
        _parameters(media.parameters, utf8),
        nstring(header_value(part, "Content-ID"), utf8=utf8),
        nstring(header_value(part, "Content-Description"), utf8=utf8),
        string(encoding),
        str(len(octets)).encode(),
    ]


def _single_part(part: Message, media: MimeValue, extensible: bool, utf8: bool, depth: int) -> bytes:
    """RFC 3501 9 body-type-1part: basic, text (+ lines) or message/rfc822 (+ envelope body lines)."""
    octets = body_octets(part)
    fields = _basic_fields(part, media, octets, utf8)
    main = media.value.split("/")[0].lower()
    nested_messages = _children(part) if media is not _OPAQUE and _is_rfc822(part) else []
    if nested_messages:
        nested = nested_messages[0]
        fields += [format_envelope(nested, utf8=utf8), _structure(nested, extensible, utf8, depth + 1)]
        fields.append(str(_line_count(octets)).encode())
    elif main == "text":
        fields.append(str(_line_count(octets)).encode())
    if extensible:
        fields += [NIL, *_extension_tail(part, utf8)]     # body-fld-md5 is NIL: we do not compute it
    return paren_list(fields)


def _multipart(part: Message, media: MimeValue, extensible: bool, utf8: bool, depth: int) -> bytes:
    """RFC 3501 9 body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]."""
    children = _children(part)
    bodies = b"".join(_structure(child, extensible, utf8, depth + 1) for child in children)
    if not bodies:
        # 1*body: a multipart with no parts still needs one; an empty text part stands in.
        bodies = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
    fields = [string(media.value.split("/")[1].upper())]
    if extensible:
        fields += [_parameters(media.parameters, utf8), *_extension_tail(part, utf8)]
    return b"(" + bodies + b" " + b" ".join(fields) + b")"


def _structure(part: Message, extensible: bool, utf8: bool, depth: int = 0) -> bytes:
    media = _content_type(part)
    if depth >= MAX_MIME_DEPTH and part.is_multipart():
        return _single_part(part, _OPAQUE, extensible, utf8, depth)
    if media.value.lower().startswith("multipart/"):
        if part.is_multipart():
            return _multipart(part, media, extensible, utf8, depth)
        # A multipart without a usable boundary is plain text to everyone (RFC 2046 5.1.1).
        media = MimeValue("TEXT/PLAIN", (("CHARSET", "US-ASCII"),))
    return _single_part(part, media, extensible, utf8, depth)


def format_bodystructure(message: Message, *, extensible: bool = True, utf8: bool = False) -> bytes:
    """BODYSTRUCTURE (extensible=True) or BODY (extensible=False) of a message (RFC 3501 7.4.2)."""
    return _structure(message, extensible, utf8)
