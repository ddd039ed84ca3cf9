"""A message's octets as FETCH serves them: the whole, the header, and body sections (RFC 3501 6.4.5).

``MessageContent`` opens the stored message lazily: a FETCH of flags never
touches the blob, a header request reads only the first block, and the full
parse happens once per message even when several sections are asked for.
Part numbering follows RFC 3501 6.4.5: a non-multipart message has one part
(1); a message/rfc822 part's subparts number the encapsulated message's parts.
Body octets come from ``structure.body_octets`` so that sizes agree with
BODYSTRUCTURE.
"""

from __future__ import annotations

import email
from email.message import Message
from email.policy import compat32

from gateway.imap.protocol.fetch import BodySection
from gateway.imap.protocol.structure import body_octets, message_octets
from gateway.mailstore.interface import FolderRef, MailStore

HEAD_BLOCK = 64 * 1024


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
        self._parsed: Message | None = None

    async def raw(self) -> bytes:
        if self._raw is None:
            async with await self.store.open_message(self.folder, self.uid) as body:
                self._raw = await body.read()
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

    async def parsed(self) -> Message:
        if self._parsed is None:
            self._parsed = email.message_from_bytes(await self.raw(), policy=compat32)
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


def _subparts(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [child for child in payload if isinstance(child, Message)]
    return []


def _is_encapsulated(part: Message) -> bool:
    return part.get_content_type() == "message/rfc822" and part.is_multipart()


def find_part(message: Message, numbers: tuple[int, ...]) -> Message | None:
    """Walk part numbers; a message/rfc822 part steps into its message for the next number."""
    current = message
    for number in numbers:
        if _is_encapsulated(current) and current is not message:
            current = _subparts(current)[0]
        if current.is_multipart():
            children = _subparts(current)
            if number > len(children):
                return None
            current = children[number - 1]
        elif number == 1:
            continue      # RFC 3501 6.4.5: a non-multipart message's only part is 1
        else:
            return None
    return current


def _part_section(part: Message, section: BodySection) -> bytes:
    if section.text == "MIME":
        return split_header(message_octets(part))[0]
    if section.text is None:
        if part.is_multipart() and not _is_encapsulated(part):
            return split_header(message_octets(part))[1]
        return body_octets(part)
    inner = _subparts(part)[0] if _is_encapsulated(part) else part
    whole = message_octets(inner)
    head, body = split_header(whole)
    if section.text == "HEADER":
        return head
    if section.text == "TEXT":
        return body
    return header_fields(head, section.fields, exclude=section.text == "HEADER.FIELDS.NOT")


def binary_octets(part: Message) -> bytes:
    """RFC 3516 4.2: the part's content with its transfer encoding removed."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""
