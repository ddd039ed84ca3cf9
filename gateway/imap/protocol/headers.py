"""Raw header parsing for ENVELOPE and BODYSTRUCTURE (RFC 5322 3.4, RFC 2045 5.1, RFC 2183 2).

IMAP hands header content to clients as written: encoded-words stay encoded
(RFC 3501 7.4.2 "the fields ... are not decoded"), so we cannot use the email
package's decoded views.  These small tokenisers work on the unfolded raw text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FOLD = re.compile(r"\r?\n(?=[ \t])")
# RFC 5322 3.2.3 specials that end an atom in an address list.
_ADDRESS_SPECIALS = '()<>[]:;@\\,."'
# RFC 2045 5.1 tspecials.
_MIME_SPECIALS = '()<>@,;:\\"/[]?='


def unfold(value: str) -> str:
    """RFC 5322 2.2.3: remove CRLF before folding white space; trailing line ends too."""
    return _FOLD.sub("", value).strip("\r\n")


@dataclass(frozen=True)
class Token:
    kind: str          # "atom", "quoted", "literal" (domain literal) or "special"
    text: str
    space_before: bool


def _read_quoted(text: str, start: int) -> tuple[str, int]:
    """RFC 5322 3.2.4 quoted-string: returns the unescaped content and the index after it."""
    out: list[str] = []
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append(text[index + 1])
            index += 2
            continue
        if char == '"':
            return "".join(out), index + 1
        out.append(char)
        index += 1
    return "".join(out), index      # unterminated: take the rest


def _skip_comment(text: str, start: int) -> int:
    """RFC 5322 3.2.2 comment, nested; returns the index after it."""
    depth = 0
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        index += 1
        if depth == 0:
            return index
    return index


def _read_domain_literal(text: str, start: int) -> tuple[str, int]:
    end = text.find("]", start)
    end = len(text) - 1 if end < 0 else end
    return text[start:end + 1], end + 1


def tokenize(text: str, specials: str = _ADDRESS_SPECIALS, *, domain_literals: bool = True) -> list[Token]:
    """Split structured header text into atoms, quoted strings, domain literals and specials."""
    tokens: list[Token] = []
    index = 0
    space = False
    while index < len(text):
        char = text[index]
        if char in " \t\r\n":
            space, index = True, index + 1
            continue
        if char == "(":
            index, space = _skip_comment(text, index), True
            continue
        if char == '"':
            content, index = _read_quoted(text, index)
            tokens.append(Token("quoted", content, space))
        elif char == "[" and domain_literals:
            content, index = _read_domain_literal(text, index)
            tokens.append(Token("literal", content, space))
        elif char in specials:
            tokens.append(Token("special", char, space))
            index += 1
        else:
            end = index
            while end < len(text) and text[end] not in specials and text[end] not in " \t\r\n":
                end += 1
            tokens.append(Token("atom", text[index:end], space))
            index = end
        space = False
    return tokens


# --- addresses -------------------------------------------------------------------

@dataclass(frozen=True)
class ImapAddress:
    """RFC 3501 7.4.2 address: (name adl mailbox host); a group start is (NIL NIL name NIL),
    a group end (NIL NIL NIL NIL)."""

    name: str | None
    adl: str | None
    mailbox: str | None
    host: str | None


GROUP_END = ImapAddress(None, None, None, None)


def _phrase(tokens: list[Token]) -> str | None:
    """A display name: words joined by single spaces, quoted strings unquoted, encoded-words kept."""
    out = ""
    for token in tokens:
        if out and token.space_before:
            out += " "
        out += token.text
    return out or None


def _joined(tokens: list[Token]) -> str:
    """local-part or domain: tokens concatenated; quoted local-parts keep their quotes."""
    return "".join(
        '"' + t.text.replace("\\", "\\\\").replace('"', '\\"') + '"' if t.kind == "quoted" else t.text
        for t in tokens)


def _is(token: Token, char: str) -> bool:
    return token.kind == "special" and token.text == char


def _addr_spec(tokens: list[Token], name: str | None, adl: str | None) -> ImapAddress | None:
    """RFC 5322 3.4.1 addr-spec = local-part "@" domain; without "@" the host is NIL."""
    if not tokens:
        return None
    at = max((i for i, t in enumerate(tokens) if _is(t, "@")), default=-1)
    if at < 0:
        return ImapAddress(name, adl, _joined(tokens), None)
    return ImapAddress(name, adl, _joined(tokens[:at]) or None, _joined(tokens[at + 1:]) or None)


def _angle_addr(tokens: list[Token], name: str | None) -> ImapAddress | None:
    """RFC 5322 3.4 angle-addr, with the obsolete route (RFC 5322 4.4) as the IMAP adl."""
    colon = next((i for i, t in enumerate(tokens) if _is(t, ":")), -1)
    adl = None
    if colon >= 0 and tokens and _is(tokens[0], "@"):
        adl = _joined(tokens[:colon]) or None
        tokens = tokens[colon + 1:]
    address = _addr_spec(tokens, name, adl)
    if address is None and name is not None:
        return ImapAddress(name, None, None, None)
    return address


def _split_top(tokens: list[Token], stop: str) -> list[list[Token]]:
    """Split on ``stop`` outside angle brackets."""
    items: list[list[Token]] = [[]]
    depth = 0
    for token in tokens:
        if _is(token, "<"):
            depth += 1
        elif _is(token, ">"):
            depth = max(0, depth - 1)
        if depth == 0 and _is(token, stop):
            items.append([])
        else:
            items[-1].append(token)
    return [item for item in items if item]


def _mailbox(tokens: list[Token]) -> ImapAddress | None:
    """RFC 5322 3.4 mailbox = name-addr / addr-spec."""
    opening = next((i for i, t in enumerate(tokens) if _is(t, "<")), -1)
    if opening < 0:
        return _addr_spec(tokens, None, None)
    closing = next((i for i, t in enumerate(tokens) if _is(t, ">") and i > opening), len(tokens))
    return _angle_addr(tokens[opening + 1:closing], _phrase(tokens[:opening]))


def _group_or_mailboxes(tokens: list[Token]) -> list[ImapAddress]:
    opening = next((i for i, t in enumerate(tokens) if _is(t, "<")), len(tokens))
    colon = next((i for i, t in enumerate(tokens) if _is(t, ":")), -1)
    if 0 <= colon < opening:
        # RFC 5322 3.4 group = display-name ":" [group-list] ";"; RFC 3501 7.4.2 group syntax.
        members = [t for t in tokens[colon + 1:] if not _is(t, ";")]
        inner = [a for item in _split_top(members, ",") if (a := _mailbox(item)) is not None]
        return [ImapAddress(None, None, _phrase(tokens[:colon]) or "", None), *inner, GROUP_END]
    address = _mailbox(tokens)
    return [] if address is None else [address]


def parse_address_list(value: str) -> list[ImapAddress]:
    """RFC 5322 3.4 address-list (tolerating empty elements) to IMAP address structures."""
    tokens = tokenize(unfold(value))
    addresses: list[ImapAddress] = []
    for item in _split_groups(tokens):
        addresses.extend(_group_or_mailboxes(item))
    return addresses


def _split_groups(tokens: list[Token]) -> list[list[Token]]:
    """Top-level items: split on "," except inside a group (":" ... ";") or angle brackets."""
    items: list[list[Token]] = [[]]
    in_group = False
    depth = 0
    for token in tokens:
        if _is(token, "<"):
            depth += 1
        elif _is(token, ">"):
            depth = max(0, depth - 1)
        elif depth == 0 and _is(token, ":") and not in_group and not _starts_route(items[-1]):
            in_group = True
        elif depth == 0 and _is(token, ";") and in_group:
            in_group = False
        if depth == 0 and not in_group and _is(token, ","):
            items.append([])
            continue
        items[-1].append(token)
    return [item for item in items if item]


def _starts_route(tokens: list[Token]) -> bool:
    return bool(tokens) and _is(tokens[0], "@")


# --- MIME headers -------------------------------------------------------------------

@dataclass(frozen=True)
class MimeValue:
    """``value *(";" attribute "=" value)`` of Content-Type / Content-Disposition, raw."""

    value: str
    parameters: tuple[tuple[str, str], ...]


def parse_mime_value(text: str) -> MimeValue:
    """RFC 2045 5.1 / RFC 2183 2: tolerant; malformed parameters are dropped."""
    tokens = tokenize(unfold(text), _MIME_SPECIALS, domain_literals=False)
    value_tokens: list[Token] = []
    index = 0
    while index < len(tokens) and not _is(tokens[index], ";"):
        value_tokens.append(tokens[index])
        index += 1
    parameters: list[tuple[str, str]] = []
    for chunk in _split_top(tokens[index:], ";"):
        if len(chunk) >= 3 and chunk[0].kind == "atom" and _is(chunk[1], "="):
            parameters.append((chunk[0].text, "".join(t.text for t in chunk[2:])))
    return MimeValue("".join(t.text for t in value_tokens), tuple(parameters))
