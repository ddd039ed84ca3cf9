"""A message's octets as FETCH serves them: the whole, the header, and body sections (RFC 3501 6.4.5).

``MessageContent`` opens the stored message lazily: a FETCH of flags never
touches the blob, a header request reads only the first block, and the MIME
tree is built once per message even when several sections are asked for.
Sections are slices of the stored octets (``protocol.mime``), numbered as RFC
3501 6.4.5 says and as Dovecot walks them (``mime.find_part``), so sizes agree
with BODYSTRUCTURE.
"""

from __future__ import annotations

import base64
import email
import quopri
import re
from email.message import Message
from email.policy import compat32

from gateway.imap.protocol.errors import UNKNOWN_CTE, ImapNo
from gateway.imap.protocol.fetch import BodySection
from gateway.imap.protocol.mime import MimePart, find_part, header_value, parse_message
from gateway.mailstore.interface import FolderRef, MailStore

__all__ = ["MessageContent", "binary_octets", "find_part", "header_fields", "split_header"]

HEAD_BLOCK = 64 * 1024
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def split_header(raw: bytes) -> tuple[bytes, bytes]:
    """RFC 5322 2.1: the header section (with its empty line) and the body."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(separator)
        if end >= 0:
            cut = end + len(separator)
            return raw[:cut], raw[cut:]
    return raw, b""


def header_fields(header: bytes, names: tuple[str, ...], *, exclude: bool) -> bytes:
    """RFC 3501 6.4.5 HEADER.FIELDS / HEADER.FIELDS.NOT: the matching fields, folding kept, then CRLF."""
    wanted = {name.lower() for name in names}
    kept: list[bytes] = []
    keep_current = False
    for line in header.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if keep_current:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        keep_current = (name in wanted) != exclude
        if keep_current:
            kept.append(line)
    return b"".join(kept) + b"\r\n"


class MessageContent:
    """One message's stored octets, read on first use."""

    def __init__(self, store: MailStore, folder: FolderRef, uid: int) -> None:
        self.store = store
        self.folder = folder
        self.uid = uid
        self._raw: bytes | None = None
        self._head: bytes | None = None
        self._parsed: MimePart | None = None

    async def raw(self) -> bytes:
        if self._raw is None:
            self._raw = await self.store.message_bytes(self.folder, self.uid)
        return self._raw

    async def head(self) -> bytes:
        """The header section, read from the first block when it fits there."""
        if self._head is None:
            if self._raw is None:
                async with await self.store.open_message(self.folder, self.uid) as body:
                    block = await body.read(0, HEAD_BLOCK)
                    if block.find(b"\r\n\r\n") < 0 and block.find(b"\n\n") < 0 and len(block) < body.size:
                        self._raw = await body.read()
                        block = self._raw
            else:
                block = self._raw
            self._head = split_header(block)[0]
        return self._head

    async def parsed(self) -> MimePart:
        if self._parsed is None:
            self._parsed = parse_message(await self.raw())
        return self._parsed

    async def head_message(self) -> Message:
        """The header alone, parsed (ENVELOPE of a message whose cached envelope is missing)."""
        return email.message_from_bytes(await self.head(), policy=compat32)

    async def section(self, section: BodySection) -> bytes:
        """BODY[section] octets (RFC 3501 6.4.5); a part that does not exist is empty."""
        if not section.part:
            return await self._top_level(section)
        part = find_part(await self.parsed(), section.part)
        if part is None:
            return b""
        return _part_section(part, section)

    async def _top_level(self, section: BodySection) -> bytes:
        if section.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            head = await self.head()
            if section.text == "HEADER":
                return head
            return header_fields(head, section.fields, exclude=section.text == "HEADER.FIELDS.NOT")
        raw = await self.raw()
        if section.text == "TEXT":
            return split_header(raw)[1]
        return raw


def _part_section(part: MimePart, section: BodySection) -> bytes:
    """RFC 3501 6.4.5: MIME is the part's own header; HEADER, HEADER.FIELDS and TEXT of a message/rfc822
    part are those of its message; no specifier is the part's body."""
    if section.text == "MIME":
        return part.header
    if section.text is None:
        return part.body
    inner = part.encapsulated or part
    if section.text == "HEADER":
        return inner.header
    if section.text == "TEXT":
        return inner.body
    return header_fields(inner.header, section.fields, exclude=section.text == "HEADER.FIELDS.NOT")


def binary_octets(part: MimePart) -> bytes:
    """RFC 3516 4.2: the part's content with its transfer encoding removed; an encoding we cannot undo is
    NO [UNKNOWN-CTE] (RFC 3516 4.3)."""
    encoding = (header_value(part.headers, "Content-Transfer-Encoding") or "").strip().lower()
    body = part.body
    if encoding in ("", "7bit", "8bit", "binary"):
        return body
    if encoding == "base64":
        # Lenient, as mail readers are: line breaks and stray characters skipped, missing padding added.
        alphabet = _NOT_BASE64.sub(b"", body)
        alphabet = alphabet[: len(alphabet) - len(alphabet) % 4 if len(alphabet) % 4 == 1 else len(alphabet)]
        return base64.b64decode(alphabet + b"=" * (-len(alphabet) % 4))
    if encoding == "quoted-printable":
        return quopri.decodestring(body)
    raise ImapNo(f"Unknown Content-Transfer-Encoding {encoding[:40]}", UNKNOWN_CTE)
