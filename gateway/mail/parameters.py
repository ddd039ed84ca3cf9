"""MAIL and RCPT parameters: SIZE, BODY, SMTPUTF8, AUTH, and the DSN ones.

Grammar: RFC 5321 4.1.2 ``esmtp-param = esmtp-keyword ["=" esmtp-value]``.
Each keyword may appear once (RFC 3461 4: a parameter given twice is an error).
The DSN parameters (RFC 3461 4.1-4.4) carry ``xtext`` values (RFC 3461 4),
decoded here so the queue stores what the sender meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.mail.codes import PARAM_NOT_SUPPORTED, SYNTAX_PARAMS, Reply, MailRefusal

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_HEX = "0123456789ABCDEF"
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100   # RFC 3461 4.4
MAX_ORCPT = 500   # RFC 3461 4.2
ORCPT_TYPES = ("rfc822", "utf-8")   # RFC 3461 4.2 and RFC 6533 3


def _refuse(detail: str) -> MailRefusal:
    return MailRefusal(SYNTAX_PARAMS.format(detail=detail))


def decode_xtext(value: str) -> str:
    """RFC 3461 4: xtext = *( xchar / hexchar ), hexchar = "+" 2HEXDIG (upper case), xchar = 33-126 but "+" and "="."""
    return decode_xtext_bytes(value).decode("utf-8", errors="replace")


def decode_xtext_bytes(value: str) -> bytes:
    """``decode_xtext`` before any character decoding: the octets the sender meant, to be validated."""
    out = bytearray()
    index = 0
    while index < len(value):
        char = value[index]
        if char == "+":
            pair = value[index + 1:index + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise _refuse(f"bad xtext escape in {value!r}")
            out.append(int(pair, 16))
            index += 3
            continue
        if not 33 <= ord(char) <= 126 or char == "=":
            raise _refuse(f"character {char!r} not allowed in xtext")
        out.append(ord(char))
        index += 1
    return bytes(out)


def _has_control(text: str) -> bool:
    """C0 controls (CR and LF among them), DEL and C1 controls: never in a value we may write into a message."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def printable_ascii(name: str, octets: bytes) -> str:
    """RFC 3461 4.2 (rfc822 ORCPT) and 4.4 (ENVID): printable US-ASCII once decoded. A CR LF smuggled as
    ``+0D+0A`` would otherwise become lines of the delivery report (RFC 3464) that quotes it."""
    text = octets.decode("latin-1")
    if _has_control(text):
        raise _refuse(f"{name} holds a control character (CR, LF or another); refused")
    if not octets.isascii():
        raise _refuse(f"{name} must be printable US-ASCII once decoded from xtext (RFC 3461 4)")
    return text


def encode_xtext(value: str) -> str:
    """The inverse of ``decode_xtext`` (used when passing DSN parameters on, RFC 3461 4)."""
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}" for b in value.encode("utf-8")
    )


def split_parameters(text: str) -> dict[str, str | None]:
    """``KEY[=VALUE] ...`` into an upper-cased-key dict; duplicates and bad keywords refused."""
    params: dict[str, str | None] = {}
    for token in text.split():
        key, eq, value = token.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise _refuse(f"bad parameter {token!r}")
        upper = key.upper()
        if upper in params:
            raise _refuse(f"parameter {upper} given twice")
        params[upper] = value if eq else None
    return params


@dataclass(frozen=True)
class MailParameters:
    """What MAIL FROM announced."""

    size: int | None = None           # RFC 1870 3
    body: str = "7BIT"                # RFC 6152 2: 7BIT or 8BITMIME
    smtputf8: bool = False            # RFC 6531 3.4
    ret: str | None = None            # RFC 3461 4.3: FULL or HDRS
    envid: str | None = None          # RFC 3461 4.4 (decoded)
    auth: str | None = None           # RFC 4954 5 (decoded xtext; "<>" when unknown)


@dataclass
class RcptParameters:
    """What RCPT TO announced (RFC 3461 4.1, 4.2)."""

    notify: frozenset[str] = field(default_factory=frozenset)   # empty: not given; {"NEVER"} or subset of NOTIFY_KEYWORDS
    orcpt: str | None = None                                   # "addr-type;decoded-address"


def parse_mail_parameters(text: str, *, dsn: bool = True) -> MailParameters:
    params = split_parameters(text)
    values: dict[str, object] = {}
    for key, value in params.items():
        if key == "SIZE":
            values["size"] = _size(value)
        elif key == "BODY":
            values["body"] = _body(value)
        elif key == "SMTPUTF8":
            if value is not None:
                raise _refuse("SMTPUTF8 takes no value")  # RFC 6531 3.4
            values["smtputf8"] = True
        elif key == "RET" and dsn:
            values["ret"] = _ret(value)
        elif key == "ENVID" and dsn:
            values["envid"] = _envid(value)
        elif key == "AUTH":
            values["auth"] = decode_xtext(_required(key, value))
        else:
            raise MailRefusal(PARAM_NOT_SUPPORTED.format(param=key))
    return MailParameters(**values)  # type: ignore[arg-type]


def parse_rcpt_parameters(text: str, *, dsn: bool = True) -> RcptParameters:
    result = RcptParameters()
    for key, value in split_parameters(text).items():
        if key == "NOTIFY" and dsn:
            result.notify = _notify(value)
        elif key == "ORCPT" and dsn:
            result.orcpt = _orcpt(value)
        else:
            raise MailRefusal(PARAM_NOT_SUPPORTED.format(param=key))
    return result


def _required(key: str, value: str | None) -> str:
    if value is None:
        raise _refuse(f"{key} needs a value")
    return value


def _size(value: str | None) -> int:
    # RFC 1870 3: size-value = 1*20DIGIT
    text = _required("SIZE", value)
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise _refuse("SIZE must be a number of octets")
    return int(text)


def _body(value: str | None) -> str:
    body = _required("BODY", value).upper()
    if body not in ("7BIT", "8BITMIME"):   # RFC 6152 2 (BINARYMIME needs CHUNKING, not offered)
        raise _refuse("BODY must be 7BIT or 8BITMIME")
    return body


def _ret(value: str | None) -> str:
    ret = _required("RET", value).upper()
    if ret not in ("FULL", "HDRS"):   # RFC 3461 4.3
        raise _refuse("RET must be FULL or HDRS")
    return ret


def _envid(value: str | None) -> str:
    raw = _required("ENVID", value)
    if len(raw) > MAX_ENVID:   # RFC 3461 4.4: at most 100 characters (encoded)
        raise _refuse(f"ENVID longer than {MAX_ENVID} characters")
    return printable_ascii("ENVID", decode_xtext_bytes(raw))


def _notify(value: str | None) -> frozenset[str]:
    # RFC 3461 4.1: NOTIFY=NEVER, or a comma list of SUCCESS, FAILURE, DELAY
    words = [w.upper() for w in _required("NOTIFY", value).split(",")]
    if words == ["NEVER"]:
        return frozenset(words)
    if not words or any(w not in NOTIFY_KEYWORDS for w in words) or len(set(words)) != len(words):
        raise _refuse("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return frozenset(words)


def _orcpt(value: str | None) -> str:
    """RFC 3461 4.2: ORCPT=addr-type ";" xtext, at most 500 characters; addr-type "rfc822" (a printable
    US-ASCII mailbox) or RFC 6533's "utf-8" (UTF-8, decoded the same way here). Never a control character:
    the value is quoted in the Original-Recipient field of delivery reports (RFC 3464 2.3.1)."""
    raw = _required("ORCPT", value)
    if len(raw) > MAX_ORCPT:
        raise _refuse(f"ORCPT longer than {MAX_ORCPT} characters")
    addr_type, semicolon, encoded = raw.partition(";")
    if not semicolon or not addr_type or not encoded or not _KEYWORD.match(addr_type):
        raise _refuse("ORCPT must be addr-type;address")
    addr_type = addr_type.lower()
    if addr_type not in ORCPT_TYPES:
        raise _refuse(f"ORCPT address type {addr_type} is not supported ({', '.join(ORCPT_TYPES)})")
    octets = decode_xtext_bytes(encoded)
    if addr_type == "rfc822":
        address = printable_ascii("ORCPT address", octets)
    else:
        address = _utf8_address(octets)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in domain:
        raise _refuse("ORCPT address is not a mailbox (local-part@domain)")
    return f"{addr_type};{address}"


def _utf8_address(octets: bytes) -> str:
    try:
        address = octets.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("ORCPT utf-8 address is not valid UTF-8 (RFC 6533 3)") from None
    if _has_control(address):
        raise _refuse("ORCPT address holds a control character (CR, LF or another); refused")
    return address


def reply_for_size(announced: int | None, limit: int, too_big: Reply) -> Reply | None:
    """RFC 1870 6.1: refuse at MAIL FROM when the announced SIZE is over the limit."""
    if announced is not None and limit and announced > limit:
        return too_big.format(limit=limit)
    return None
