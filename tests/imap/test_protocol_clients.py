"""Real client bytes through the reader and parser: Python's imaplib talks to a tiny in-test responder.

The responder only acknowledges (it is not the session layer): it answers "+"
to synchronising literals, ``OK`` to every command, and records what the parser
made of each one.  What imaplib really writes on the socket (quoting, escapes,
literals, CHARSET, UTF-8 after ENABLE) must come out as the expected commands.
"""

from __future__ import annotations

import asyncio
import imaplib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.imap.protocol import commands as c
from gateway.imap.protocol import response as r
from gateway.imap.protocol.errors import ImapError
from gateway.imap.protocol.fetch import BodySection, FetchAttribute
from gateway.imap.protocol.parser import ParserOptions, parse_command
from gateway.imap.protocol.reader import ClientDisconnected, CommandReader, ContinuationRequest
from gateway.imap.protocol.search import SearchAnd, SearchFlag, SearchHeader
from gateway.imap.protocol.sequence import SequenceRange, SequenceSet

CAPABILITIES = ["IMAP4rev1", "ENABLE", "UTF8=ACCEPT", "MOVE", "UIDPLUS", "NAMESPACE", "QUOTA", "IDLE"]


class Responder:
    """Acknowledges every command and keeps the parsed ones."""

    def __init__(self) -> None:
        self.received: list[c.Command] = []
        self.options = ParserOptions()

    async def handle(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(r.greeting("test responder ready"))
        reader = CommandReader(stream)

        async def send_continuation(request: ContinuationRequest) -> None:
            writer.write(r.continuation())
            await writer.drain()

        try:
            while True:
                raw = await reader.read_command(send_continuation)
                try:
                    command = parse_command(raw, self.options)
                except ImapError as error:
                    writer.write(error.response())
                    continue
                self.received.append(command)
                writer.write(self.answer(command))
                await writer.drain()
        except ClientDisconnected:
            writer.close()

    def answer(self, command: c.Command) -> bytes:
        untagged = b""
        if isinstance(command, c.Capability):
            untagged = r.capability(CAPABILITIES)
        elif isinstance(command, c.Enable):
            self.options = ParserOptions(utf8="UTF8=ACCEPT" in command.capabilities)
            untagged = r.enabled(command.capabilities)
        elif isinstance(command, c.Logout):
            untagged = r.bye("bye")
        return untagged + r.ok(command.tag, f"{command.name} done")


@pytest.fixture
async def responder() -> AsyncIterator[tuple[Responder, int]]:
    instance = Responder()
    server = await asyncio.start_server(instance.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield instance, port


async def run_client(port: int, script: Callable[[imaplib.IMAP4], Any]) -> None:
    def session() -> None:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        try:
            script(client)
        finally:
            client.logout()
    await asyncio.to_thread(session)


def without_capability(received: list[c.Command]) -> list[c.Command]:
    return [command for command in received if not isinstance(command, (c.Capability, c.Logout))]


async def test_imaplib_session_commands_parse(responder: tuple[Responder, int]) -> None:
    instance, port = responder

    def script(client: imaplib.IMAP4) -> None:
        client.login("dr.martin@hopital.example", 'pa"ss\\word with spaces')
        client.select("INBOX")
        client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (From Subject)])")
        client.append("Sent", "(\\Seen)", imaplib.Time2Internaldate(0), b"Subject: hi\r\n\r\nbody\r\n")
        client.store("2:4", "+FLAGS.SILENT", "(\\Deleted)")
        client.uid("MOVE", "7", "Archive")
        client.status("INBOX", "(MESSAGES UNSEEN)")
        client.search(None, "UNSEEN", 'FROM "alice"')

    await run_client(port, script)
    received = without_capability(instance.received)
    assert received[0] == c.Login(received[0].tag, "dr.martin@hopital.example", 'pa"ss\\word with spaces')
    assert received[1] == c.Select(received[1].tag, "INBOX")
    fetch = received[2]
    assert isinstance(fetch, c.Fetch) and fetch.uid
    assert fetch.sequence_set == SequenceSet((SequenceRange(1, None),))
    assert fetch.attributes == (FetchAttribute("UID"), FetchAttribute("FLAGS"), FetchAttribute(
        "BODY", BodySection(text="HEADER.FIELDS", fields=("From", "Subject")), None, True))
    append = received[3]
    assert isinstance(append, c.Append)
    assert append.mailbox == "Sent" and append.flags == ("\\Seen",)
    assert append.message == b"Subject: hi\r\n\r\nbody\r\n" and append.internal_date is not None
    assert received[4] == c.Store(received[4].tag, SequenceSet.of((2, 4)), c.StoreMode.ADD, True, ("\\Deleted",))
    assert received[5] == c.Move(received[5].tag, SequenceSet.of(7), "Archive", uid=True)
    assert received[6] == c.Status(received[6].tag, "INBOX", ("MESSAGES", "UNSEEN"))
    assert received[7] == c.Search(received[7].tag, SearchAnd((SearchFlag("\\Seen", False),
                                                               SearchHeader("from", "alice"))))


async def test_imaplib_charset_search_with_a_literal(responder: tuple[Responder, int]) -> None:
    instance, port = responder

    def script(client: imaplib.IMAP4) -> None:
        client.login("bob", "pw")
        client.select("INBOX")
        # imaplib sends it as a synchronising literal (typeshed types the attribute as str).
        client.literal = "Compte rendu été".encode()  # type: ignore[assignment]
        client.search("UTF-8", "SUBJECT")

    await run_client(port, script)
    search = without_capability(instance.received)[2]
    assert isinstance(search, c.Search)
    assert search.charset == "UTF-8" and search.criteria == SearchHeader("subject", "Compte rendu été")


async def test_imaplib_utf8_accept_mailbox_names(responder: tuple[Responder, int]) -> None:
    """RFC 3501 5.1.3 names before ENABLE UTF8=ACCEPT, UTF-8 names after it (RFC 6855 3)."""
    instance, port = responder

    def script(client: imaplib.IMAP4) -> None:
        client.login("bob", "pw")
        client.create('"&AMk-l&AOk-ments envoy&AOk-s"')   # imaplib leaves quoting and UTF-7 to us
        client.enable("UTF8=ACCEPT")
        client.select('"Éléments envoyés"')
        client.search(None, "SUBJECT", '"été"')

    await run_client(port, script)
    received = without_capability(instance.received)
    assert received[1] == c.Create(received[1].tag, "Éléments envoyés")
    assert received[2] == c.Enable(received[2].tag, ("UTF8=ACCEPT",))
    assert received[3] == c.Select(received[3].tag, "Éléments envoyés")
    assert received[4] == c.Search(received[4].tag, SearchHeader("subject", "été"))
