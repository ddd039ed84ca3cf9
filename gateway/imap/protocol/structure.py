"""ENVELOPE and BODY/BODYSTRUCTURE (RFC 3501 7.4.2, 9 ``envelope``, ``body``).

Input is the MIME tree of ``mime.parse_message``: parts are slices of the
stored octets (CRLF line ends, RFC 3501 2.3.4), so the sizes and line counts
given here are those of the octets BODY[section] serves.  Header content is
served raw (encoded-words untouched).
"""

from __future__ import annotations

from email.message import Message

from gateway.imap.protocol.headers import ImapAddress, MimeValue, parse_address_list, parse_mime_value
from gateway.imap.protocol.mime import (
    MAX_MIME_DEPTH, TEXT_PLAIN, MimePart, header_value, mime_depth, parse_message,
)
from gateway.imap.protocol.response import NIL, nstring, paren_list, string

__all__ = ["MAX_MIME_DEPTH", "body_octets", "format_address_list", "format_bodystructure", "format_envelope",
           "header_octets", "header_value", "mime_depth", "parse_message"]

_ENVELOPE_ADDRESSES = ("From", "Sender", "Reply-To", "To", "Cc", "Bcc")


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


def format_envelope(message: Message | MimePart, *, utf8: bool = False) -> bytes:
    """RFC 3501 7.4.2 ENVELOPE: date subject from sender reply-to to cc bcc in-reply-to message-id.

    Sender and Reply-To default to From when absent or empty (RFC 3501 7.4.2).
    """
    if isinstance(message, MimePart):
        message = message.headers
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

def header_octets(part: MimePart) -> bytes:
    """The header of a message or part as written, blank line included (BODY[HEADER] / BODY[n.MIME])."""
    return part.header


def body_octets(part: MimePart) -> bytes:
    """The body of a part as transferred (still content-transfer-encoded): a message/rfc822 body is the
    nested message; a multipart body keeps its preamble, boundaries and epilogue (RFC 2046 5.1.1)."""
    return part.body


def _line_count(octets: bytes) -> int:
    """RFC 3501 9 body-fld-lines: text lines, a last line without its line end included."""
    partial_last = 1 if octets and not octets.endswith(b"\n") else 0
    return octets.count(b"\n") + partial_last


# --- BODYSTRUCTURE ---------------------------------------------------------------------

def _parameters(parameters: tuple[tuple[str, str], ...], utf8: bool) -> bytes:
    """RFC 3501 9 body-fld-param = "(" string SP string *(SP string SP string) ")" / nil."""
    if not parameters:
        return NIL
    return paren_list(string(name.upper()) + b" " + string(value, utf8=utf8) for name, value in parameters)


def _disposition(part: MimePart, utf8: bool) -> bytes:
    """RFC 3501 9 body-fld-dsp = "(" string SP body-fld-param ")" / nil (RFC 2183)."""
    raw = header_value(part.headers, "Content-Disposition")
    if not raw:
        return NIL
    parsed = parse_mime_value(raw)
    if not parsed.value:
        return NIL
    return b"(" + string(parsed.value.upper()) + b" " + _parameters(parsed.parameters, utf8) + b")"


def _language(part: MimePart) -> bytes:
    """RFC 3501 9 body-fld-lang = nstring / "(" string *(SP string) ")" (RFC 3282 Content-Language)."""
    raw = header_value(part.headers, "Content-Language")
    tags = [tag.strip() for tag in (raw or "").split(",") if tag.strip()]
    if not tags:
        return NIL
    return string(tags[0]) if len(tags) == 1 else paren_list(string(tag) for tag in tags)


def _extension_tail(part: MimePart, utf8: bool) -> list[bytes]:
    """body-fld-dsp SP body-fld-lang SP body-fld-loc (RFC 3501 9, RFC 2557 Content-Location)."""
    return [_disposition(part, utf8), _language(part),
            nstring(header_value(part.headers, "Content-Location"), utf8=utf8)]


def _basic_fields(part: MimePart, media: MimeValue, octets: bytes, utf8: bool) -> list[bytes]:
    """RFC 3501 9 body-fields = body-fld-param SP body-fld-id SP body-fld-desc SP body-fld-enc SP body-fld-octets."""
    main, sub = media.value.split("/")
    encoding = (header_value(part.headers, "Content-Transfer-Encoding") or "7BIT").strip().upper() or "7BIT"
    return [
        string(main.upper()), string(sub.upper()),
        _parameters(media.parameters, utf8),
        nstring(header_value(part.headers, "Content-ID"), utf8=utf8),
        nstring(header_value(part.headers, "Content-Description"), utf8=utf8),
        string(encoding),
        str(len(octets)).encode(),
    ]


def _single_part(part: MimePart, media: MimeValue, extensible: bool, utf8: bool) -> bytes:
    """RFC 3501 9 body-type-1part: basic, text (+ lines) or message/rfc822 (+ envelope body lines)."""
    octets = part.body
    fields = _basic_fields(part, media, octets, utf8)
    nested = part.encapsulated if media is part.media else None
    if nested is not None:
        fields += [format_envelope(nested.headers, utf8=utf8), _structure(nested, extensible, utf8)]
        fields.append(str(_line_count(octets)).encode())
    elif media.value.split("/")[0].lower() == "text":
        fields.append(str(_line_count(octets)).encode())
    if extensible:
        fields += [NIL, *_extension_tail(part, utf8)]     # body-fld-md5 is NIL: we do not compute it
    return paren_list(fields)


def _multipart(part: MimePart, extensible: bool, utf8: bool) -> bytes:
    """RFC 3501 9 body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]."""
    bodies = b"".join(_structure(child, extensible, utf8) for child in part.children or ())
    if not bodies:
        # 1*body: a multipart whose boundary never occurs still needs one; an empty text part stands in
        # (as Dovecot does).
        bodies = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
    fields = [string(part.media.value.split("/")[1].upper())]
    if extensible:
        fields += [_parameters(part.media.parameters, utf8), *_extension_tail(part, utf8)]
    return b"(" + bodies + b" " + b" ".join(fields) + b")"


def _structure(part: MimePart, extensible: bool, utf8: bool) -> bytes:
    if part.is_multipart:
        return _multipart(part, extensible, utf8)
    media = part.media
    if media.value.lower().startswith("multipart/"):
        # A multipart without a boundary parameter (or nested too deeply) is plain text to everyone
        # (RFC 2046 5.1.1).
        media = TEXT_PLAIN
    return _single_part(part, media, extensible, utf8)


def format_bodystructure(message: MimePart, *, extensible: bool = True, utf8: bool = False) -> bytes:
    """BODYSTRUCTURE (extensible=True) or BODY (extensible=False) of a message (RFC 3501 7.4.2)."""
    return _structure(message, extensible, utf8)
