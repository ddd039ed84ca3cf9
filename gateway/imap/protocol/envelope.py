"""RFC 3501 7.4.2 ENVELOPE rendered from the structure the mail store caches at delivery (pure, no I/O).

The cached structure (``gateway.mailstore.headers.parse_headers``) holds the raw field values and the
address structures (name adl mailbox host, group markers included); rendering it gives the same octets
as ``structure.format_envelope`` on the message's header.  A sealed mail store keeps the rendering
itself (``WIRE_VERSION``): a FETCH then decrypts one value per message and sends it as is.
"""

from __future__ import annotations

from typing import Any

from gateway.imap.protocol import response

ENVELOPE_ADDRESSES = ("from", "sender", "reply-to", "to", "cc", "bcc")
# Bumped whenever the rendering below changes: a stored rendering of another version is not used (the
# message's header is parsed instead) until ``gateway mailbox reindex`` renders it again.
WIRE_VERSION = "imap1"


# The addresses rendered at delivery, kept from one message to the next (a mailbox's mail comes from and goes
# to the same few correspondents), bounded as a writer's own; as parse_headers keeps their parsed form.
_DELIVERED_ADDRESSES: dict[tuple[Any, ...], bytes] = {}


def render_envelope(cached: dict[str, Any]) -> bytes:
    """The ENVELOPE as sent to a session without UTF8=ACCEPT (see ``usable_wire`` for one with it)."""
    return EnvelopeWriter(utf8=False, addresses=_DELIVERED_ADDRESSES).envelope(cached)


def usable_wire(wire: bytes, *, utf8: bool) -> bool:
    """A rendering without UTF8=ACCEPT is the same octets with it when all ASCII: RFC 6855 3 only changes
    how non-ASCII strings are sent (quoted instead of literals)."""
    return not utf8 or wire.isascii()


class EnvelopeWriter:
    """Renders cached ENVELOPEs; the addresses and strings of one mailbox repeat (the same correspondents,
    the same subjects), so each distinct one is rendered once and remembered, within bounds."""

    MAX_REMEMBERED = 4096

    def __init__(self, *, utf8: bool, addresses: dict[tuple[Any, ...], bytes] | None = None) -> None:
        """``addresses``: the rendered addresses to remember in (one shared by several writers of the same
        ``utf8``); a dictionary of this writer's own by default."""
        self.utf8 = utf8
        self._strings: dict[str, bytes] = {}
        self._addresses: dict[tuple[Any, ...], bytes] = {} if addresses is None else addresses

    def envelope(self, cached: dict[str, Any]) -> bytes:
        string = self.nstring
        fields = [string(cached.get("date")), string(cached.get("subject"))]
        fields += [self.address_list(cached.get(name)) for name in ENVELOPE_ADDRESSES]
        fields += [string(cached.get("in-reply-to")), string(cached.get("message-id"))]
        return b"(" + b" ".join(fields) + b")"

    def nstring(self, value: Any) -> bytes:
        if value is None:
            return response.NIL
        rendered = self._strings.get(value)
        if rendered is None:
            rendered = response.nstring(value, utf8=self.utf8)
            if len(self._strings) < self.MAX_REMEMBERED:
                self._strings[value] = rendered
        return rendered

    def address_list(self, addresses: Any) -> bytes:
        """RFC 3501 9 address = "(" addr-name SP addr-adl SP addr-mailbox SP addr-host ")"; none is NIL."""
        if not addresses:
            return response.NIL
        return b"(" + b"".join(self._address(address) for address in addresses) + b")"

    def _address(self, address: Any) -> bytes:
        key = tuple(address)
        rendered = self._addresses.get(key)
        if rendered is None:
            rendered = response.paren_list(response.nstring(part, utf8=self.utf8) for part in address)
            if len(self._addresses) < self.MAX_REMEMBERED:
                self._addresses[key] = rendered
        return rendered
