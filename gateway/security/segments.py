"""Segmented AES-256-GCM: the one sealing scheme of the blob store and of the sealed spool.

A stream is cut into segments, each sealed with AES-GCM under a nonce made of a
per-stream random prefix, the segment's index and a last-segment flag (the
STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, "Online
authenticated-encryption and its nonce-reuse misuse-resistance", 2015). Dropping,
reordering or truncating segments therefore fails authentication, and a reader
can open any one segment without the ones before it (byte-range reads).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_COUNTER = struct.Struct("!IB")  # segment index, last-segment flag


class SegmentAead:
    """Seals and opens the segments of one stream under ``key``, binding every segment to ``aad``."""

    def __init__(self, key: bytes, nonce_prefix: bytes, aad: bytes, *,
                 failure: Callable[[int], Exception]) -> None:
        self._aead = AESGCM(key)
        self._prefix = nonce_prefix
        self._aad = aad
        self._failure = failure

    def _nonce(self, index: int, last: bool) -> bytes:
        return self._prefix + _COUNTER.pack(index, 1 if last else 0)

    def seal(self, index: int, plaintext: bytes, last: bool) -> bytes:
        return self._aead.encrypt(self._nonce(index, last), plaintext, self._aad)

    def open(self, index: int, sealed: bytes, last: bool) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(index, last), sealed, self._aad)
        except InvalidTag:
            raise self._failure(index) from None
