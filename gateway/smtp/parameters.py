"""MAIL and RCPT parameters: SIZE, BODY, SMTPUTF8, AUTH, and the DSN ones.

Grammar: RFC 5321 4.1.2 ``esmtp-param = esmtp-keyword ["=" esmtp-value]``.
Each keyword may appear once (RFC 3461 4: a parameter given twice is an error).
The DSN parameters (RFC 3461 4.1-4.4) carry ``xtext`` values (RFC 3461 4),
decoded here so the queue stores what the sender meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.smtp.codes import PARAM_NOT_SUPPORTED, SYNTAX_PARAMS, Reply, SmtpRefusal

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_HEX = "0123456789ABCDEF"
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100   # RFC 3461 4.4


def _refuse(detail: str) -> SmtpRefusal:
    return SmtpRefusal(SYNTAX_PARAMS.format(detail=detail))


def decode_xtext(value: str) -> str:
    """RFC 3461 4: xtext = *( xchar / hexchar ), hexchar = "+" 2HEXDIG (upper case), xchar = 33-126 but "+" and "="."""
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
    return out.decode("utf-8", errors="replace")


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
            raise SmtpRefusal(PARAM_NOT_SUPPORTED.format(param=key))
    return MailParameters(**values)  # type: ignore[arg-type]


def parse_rcpt_parameters(text: str, *, dsn: bool = True) -> RcptParameters:
    result = RcptParameters()
    for key, value in split_parameters(text).items():
        if key == "NOTIFY" and dsn:
            result.notify = _notify(value)
        elif key == "ORCPT" and dsn:
            result.orcpt = _orcpt(value)
        else:
            raise SmtpRefusal(PARAM_NOT_SUPPORTED.format(param=key))
    return result


def _required(key: str, value: str | None) -> str:
    if value is None:
        raise _refuse(f"{key} needs a value")
    return value


def _size(value: str | None) -> int:
    # RFC 1870 3: size-value = 1*20DIGIT
    text = _required("SIZE", value)
    if not text.isdigit() or len(text) > 20:
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
    return decode_xtext(raw)


def _notify(value: str | None) -> frozenset[str]:
    # RFC 3461 4.1: NOTIFY=NEVER, or a comma list of SUCCESS, FAILURE, DELAY
    words = [w.upper() for w in _required("NOTIFY", value).split(",")]
    if words == ["NEVER"]:
        return frozenset(words)
    if not words or any(w not in NOTIFY_KEYWORDS for w in words) or len(set(words)) != len(words):
        raise _refuse("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return frozenset(words)


def _orcpt(value: str | None) -> str:
    # RFC 3461 4.2: ORCPT=addr-type ";" xtext; addr-type is an atom, "rfc822" in practice
    # (RFC 6533 adds "utf-8", whose value is utf-8-addr-xtext, decoded the same way here).
    addr_type, semicolon, address = _required("ORCPT", value).partition(";")
    if not semicolon or not addr_type or not address or not _KEYWORD.match(addr_type):
        raise _refuse("ORCPT must be addr-type;address")
    return f"{addr_type.lower()};{decode_xtext(address)}"


def reply_for_size(announced: int | None, limit: int, too_big: Reply) -> Reply | None:
    """RFC 1870 6.1: refuse at MAIL FROM when the announced SIZE is over the limit."""
    if announced is not None and limit and announced > limit:
        return too_big.format(limit=limit)
    return None
