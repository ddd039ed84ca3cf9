"""Random octets for values that are stored in the clear beside what they protect: AEAD nonces and nonce
prefixes, salts, blob and queue ids. Never for keys (``gateway.security.keys`` draws those from
``secrets`` itself).

Each message takes about ten of these (its spool file's salt and nonce prefix, its blob's id, salt and
prefix, one nonce per sealed header field, its queue id), and every ``os.urandom`` call releases the GIL
for a ``getrandom`` system call: with the worker threads waiting for the GIL, each such call is a thread
switch of the event loop. Here they come from a buffer refilled from ``os.urandom`` 4 KiB at a time.

Uniqueness is what a nonce needs, and it holds: the buffer is consumed under a lock, each octet handed out
once; a forked child empties its copy before its first draw (``os.register_at_fork``), so parent and
child never hand out the same octets. What these values protect does not depend on them staying secret
(they are written next to the ciphertext), so keeping the next few in memory discloses nothing.
"""

from __future__ import annotations

import os
import threading

REFILL = 4096


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def take(self, count: int) -> bytes:
        if count > REFILL // 4:
            return os.urandom(count)
        with self._lock:
            if self._offset + count > len(self._buffer):
                self._buffer = os.urandom(REFILL)
                self._offset = 0
            start = self._offset
            self._offset += count
            return self._buffer[start:self._offset]

    def forget(self) -> None:
        self._lock = threading.Lock()           # a lock held by another thread at the fork stays held in the child
        self._buffer = b""
        self._offset = 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def nonce_bytes(count: int) -> bytes:
    """``count`` random octets (from the operating system's CSPRNG, buffered), never handed out twice."""
    return _POOL.take(count)


def nonce_hex(count: int) -> str:
    """``nonce_bytes(count)`` as lowercase hexadecimal (``2 * count`` characters)."""
    return _POOL.take(count).hex()
