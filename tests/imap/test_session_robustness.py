"""Hostile or broken input: oversized literals and lines, clients that vanish, half-open
connections.  The session answers with the RFC's codes and stays usable, or closes with BYE."""

from __future__ import annotations

import socket
import time

from gateway.imap.server import ImapServer, ImapServerConfig
from tests.imap.imap_server import HOST, Conversation, RunningImap, imap  # noqa: F401 (fixture)


def test_append_beyond_the_limit_is_toobig_before_any_byte_is_sent(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap)
    # RFC 7888 4 / RFC 4469 5: a synchronising literal is refused before the client sends it.
    lines = conversation.command("APPEND INBOX {999999999}", expect="NO")
    assert "[TOOBIG]" in lines[-1]
    conversation.command("NOOP")
    conversation.close()


def test_overlong_line_is_bad_and_the_session_goes_on(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap)
    lines = conversation.command("NOOP " + "x" * 70_000, expect="BAD")
    assert "too long" in lines[-1].lower()
    conversation.command("NOOP")
    conversation.close()


def test_non_synchronising_literal_too_large_to_skip_closes_the_connection(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap)
    conversation.send("t1 LOGIN {99999999999+}")
    assert conversation.line().startswith("t1 BAD")
    assert conversation.line().startswith("* BYE")
    conversation.close()


def test_vanished_clients_release_their_connection_slots(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    for _ in range(25):
        Conversation(imap, account).runner.sock.close()      # no LOGOUT: the socket just goes away
    assert imap.listeners is not None
    limiter = imap.listeners.server.context.limiter
    deadline = time.monotonic() + 30
    while limiter.count(account.address) and time.monotonic() < deadline:
        time.sleep(0.05)
    Conversation(imap, account).command("LOGOUT")


def test_half_open_connection_gets_bye_after_the_pre_auth_timeout(imap: RunningImap) -> None:  # noqa: F811
    assert imap.listeners is not None
    running = imap.listeners.server
    config = ImapServerConfig(host=HOST, starttls_port=0, implicit_tls_port=0,
                              tls_context=running.config.tls_context, pre_auth_timeout=0.3)
    server = ImapServer(config, running.context)
    imap.run(server.start())
    try:
        port = server.addresses()[0][1]
        with socket.create_connection((HOST, port), timeout=30) as raw:
            received = b""
            while b"* BYE" not in received:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                received += chunk
        assert b"* BYE Autologout" in received
    finally:
        imap.run(server.close())


def test_garbage_and_unknown_commands_are_bad(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap, login=False)
    conversation.send("\x00\x01\x02 garbage")
    assert conversation.line().startswith(("* BAD", "\x00"))
    for command in ("UID FROB 1", "SELECT", "FETCH", 'LOGIN "unterminated'):
        assert conversation.command(command, expect="BAD")[-1].split(" ")[1] == "BAD"
    conversation.close()


def test_list_pattern_with_many_wildcards_cannot_stall_the_server(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap, imap.new_account())
    conversation.command("CREATE " + "a" * 200)
    # With backtracking regular expressions this pattern would take ages against the name above.
    lines = conversation.command('LIST "" "' + "*a" * 40 + 'b"')
    assert lines == [lines[-1]] and " OK " in lines[-1]
    conversation.close()
