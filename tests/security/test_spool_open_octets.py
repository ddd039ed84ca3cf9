"""``SpoolCipher.open_octets`` (a queue row's sealed content opened in one piece, as local delivery reads
it) gives exactly what the spool's stream reader reads, and fails exactly where it fails: any plaintext
(segment boundaries included), any damage (cut, flipped, appended, another binding)."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.security.at_rest import SPOOL_HEADER, SPOOL_SEGMENT, SealedDataError, SpoolCipher

CIPHER = SpoolCipher(7, bytes(range(32)))
BINDING = "1a2b3c4d5e6f70819"


def _sealed(plaintext: bytes, binding: str = BINDING) -> bytes:
    out: list[bytes] = []
    writer = CIPHER.writer(out.append, binding)
    for offset in range(0, len(plaintext), 5000):
        writer.write(plaintext[offset:offset + 5000])
    writer.finish()
    return b"".join(out)


def _streamed(content: bytes, binding: str) -> bytes | type[Exception]:
    try:
        with CIPHER.stream_reader(io.BytesIO(content), binding) as stream:
            return stream.read()
    except SealedDataError:
        return SealedDataError


def _opened(content: bytes, binding: str) -> bytes | type[Exception]:
    try:
        return CIPHER.open_octets(content, binding)
    except SealedDataError:
        return SealedDataError


_SIZES = st.one_of(st.integers(0, 300), st.sampled_from([SPOOL_SEGMENT - 1, SPOOL_SEGMENT, SPOOL_SEGMENT + 1,
                                                          2 * SPOOL_SEGMENT, 2 * SPOOL_SEGMENT + 17]))


@settings(max_examples=150, deadline=None)
@given(size=_SIZES, seed=st.binary(min_size=1, max_size=64),
       damage=st.sampled_from(["none", "cut", "flip", "append", "binding", "header-only", "cut-header"]),
       where=st.integers(0, 10**6))
def test_open_octets_is_what_the_stream_reads(size: int, seed: bytes, damage: str, where: int) -> None:
    plaintext = (seed * (size // len(seed) + 1))[:size]
    content, binding = _sealed(plaintext), BINDING
    if damage == "cut":
        content = content[:SPOOL_HEADER.size + where % (len(content) - SPOOL_HEADER.size + 1)]
    elif damage == "flip":
        position = where % len(content)
        content = content[:position] + bytes([content[position] ^ 1]) + content[position + 1:]
    elif damage == "append":
        content += seed
    elif damage == "binding":
        binding = "another"
    elif damage == "header-only":
        content = content[:SPOOL_HEADER.size]
    elif damage == "cut-header":
        content = content[:where % SPOOL_HEADER.size]
    expected = _streamed(content, binding)
    assert _opened(content, binding) == expected
    if damage == "none":
        assert expected == plaintext


@pytest.mark.parametrize("content", [b"", b"Subject: written before sealing\r\n\r\nbody\r\n"])
def test_unsealed_content_passes_through(content: bytes) -> None:
    assert CIPHER.open_octets(content, BINDING) == content == _streamed(content, BINDING)
