"""gateway.security.nonces: buffered random octets for nonces, salts and ids, never handed out twice."""

from __future__ import annotations

import os

from gateway.security.nonces import REFILL, nonce_bytes, nonce_hex


def test_every_draw_is_new_across_refills() -> None:
    drawn = [nonce_bytes(12) for _ in range(3 * REFILL // 12)]
    assert all(len(value) == 12 for value in drawn)
    assert len(set(drawn)) == len(drawn)


def test_hex_is_twice_the_octets() -> None:
    value = nonce_hex(16)
    assert len(value) == 32 and int(value, 16) >= 0


def test_a_large_draw_comes_straight_from_the_system() -> None:
    assert len(nonce_bytes(REFILL)) == REFILL


def test_a_forked_child_never_repeats_the_parents_octets() -> None:
    nonce_bytes(1)                                   # the parent's buffer is filled: the child inherits a copy
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:                                   # pragma: no cover  (runs in the child)
        try:
            os.write(writing, nonce_bytes(32))
        finally:
            os._exit(0)
    os.close(writing)
    from_child = os.read(reading, 64)
    os.close(reading)
    os.waitpid(child, 0)
    assert len(from_child) == 32
    assert from_child != nonce_bytes(32)             # the parent's next octets: the child refilled its own
