"""Authentication from the client's side and the attacker's: TLS first, SASL PLAIN and EXTERNAL,
the per-user connection limit said as a limit, failures counted, STARTTLS injection refused."""

from __future__ import annotations

import dataclasses
import imaplib
import socket
import ssl
import warnings

import pytest

from gateway.imap.server import ImapServer
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from tests.imap.imap_server import HOST, Conversation, RunningImap, imap  # noqa: F401 (fixture)


def test_login_over_starttls_with_imaplib(imap: RunningImap) -> None:  # noqa: F811
    client = imaplib.IMAP4(HOST, imap.starttls_port, timeout=30)
    assert "LOGINDISABLED" in client.capabilities and "STARTTLS" in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        client.login(imap.doctor.address, imap.doctor.password)
    client.starttls(imap.client_context())
    assert "AUTH=PLAIN" in client.capabilities and "LOGINDISABLED" not in client.capabilities
    status, _ = client.login(imap.doctor.address, imap.doctor.password)
    assert status == "OK"
    _, data = client.capability()
    listed = data[-1].split()
    assert b"IDLE" in listed and b"AUTH=PLAIN" not in listed
    client.logout()


def test_authenticate_plain_with_imaplib(imap: RunningImap) -> None:  # noqa: F811
    client = imap.imaps()
    account = imap.doctor
    status, _ = client.authenticate("PLAIN", lambda _: f"\0{account.address}\0{account.password}".encode())
    assert status == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_wrong_password_is_authenticationfailed_and_three_end_the_connection(imap: RunningImap) -> None:  # noqa: F811
    conversation = Conversation(imap, login=False)
    for attempt in range(3):
        lines = conversation.command(f"LOGIN {imap.doctor.address} wrong-{attempt}", expect="NO")
        assert "[AUTHENTICATIONFAILED]" in lines[-1]
    assert conversation.line().startswith("* BYE")
    conversation.close()


def test_external_with_the_lab_client_certificate(imap: RunningImap) -> None:  # noqa: F811
    lab = imap.account("APP")
    assert lab.client_certificate and lab.client_key
    context = imap.client_context()
    context.load_cert_chain(lab.client_certificate, lab.client_key)
    client = imaplib.IMAP4_SSL(HOST, imap.imaps_port, ssl_context=context, timeout=30)
    assert "AUTH=EXTERNAL" in client.capabilities
    status, _ = client.authenticate("EXTERNAL", lambda _: b"")
    assert status == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_external_without_a_certificate_fails(imap: RunningImap) -> None:  # noqa: F811
    client = imap.imaps()
    assert "AUTH=EXTERNAL" not in client.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("EXTERNAL", lambda _: b"")
    client.logout()


def test_connection_limit_is_a_limit_not_bad_credentials(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    sessions = [Conversation(imap, account) for _ in range(20)]
    extra = Conversation(imap, login=False)
    lines = extra.command(f"LOGIN {account.address} {account.password}", expect="NO")
    assert "[LIMIT]" in lines[-1] and "AUTHENTICATIONFAILED" not in lines[-1]
    sessions[0].command("LOGOUT")
    extra.command(f"LOGIN {account.address} {account.password}")
    for session in [*sessions, extra]:
        session.close()


def test_commands_pipelined_after_starttls_are_dropped(imap: RunningImap) -> None:  # noqa: F811
    raw = socket.create_connection((HOST, imap.starttls_port), timeout=15)
    greeting = raw.recv(4096)
    assert greeting.startswith(b"* OK")
    # CVE-2011-0411 style injection: a command sent in clear behind STARTTLS must never run.
    raw.sendall(b"a1 STARTTLS\r\na2 CAPABILITY\r\n")
    reply = b""
    while b"\r\n" not in reply:
        reply += raw.recv(4096)
    assert reply.startswith(b"a1 OK")
    tls = imap.client_context().wrap_socket(raw)
    tls.sendall(b"a3 NOOP\r\n")
    answer = b""
    while b"a3 " not in answer:
        answer += tls.recv(4096)
    assert b"a2 " not in answer
    tls.close()


def test_tls_is_1_2_or_newer(imap: RunningImap) -> None:  # noqa: F811
    context = imap.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)    # the point is to offer old versions
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection((HOST, imap.imaps_port), timeout=15) as raw:
            with context.wrap_socket(raw) as tls:
                tls.recv(100)


def test_a_patient_sees_only_their_own_mailbox(imap: RunningImap) -> None:  # noqa: F811
    patient = imap.account("PAT")
    conversation = Conversation(imap, patient)
    assert conversation.command("NAMESPACE")[0] == '* NAMESPACE (("" "/")) NIL NIL'
    listed = conversation.command('LIST "" "*"')
    assert not any("Shared" in line for line in listed)
    doctor_inbox = f"Shared/{imap.doctor.address}/INBOX"
    assert "[NONEXISTENT]" in conversation.command(f"SELECT {doctor_inbox}", expect="NO")[-1]
    conversation.close()


def test_first_login_of_a_mailbox_that_never_received_mail(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account(provision=False)
    conversation = Conversation(imap, account)
    listed = conversation.command('LIST "" "*"')
    assert listed[0] == '* LIST (\\HasNoChildren) "/" INBOX'
    assert '* LIST (\\HasNoChildren \\Sent) "/" Sent' in listed and '* LIST (\\HasNoChildren \\Trash) "/" Trash' in listed
    assert len(conversation.command('LSUB "" "*"')) == 7      # six folders, all subscribed, and the OK
    conversation.command("SELECT INBOX")
    conversation.close()


def test_repeated_failures_lock_the_login_and_say_so(imap: RunningImap) -> None:  # noqa: F811
    assert imap.listeners is not None
    running = imap.listeners.server
    # A server of its own, so that throttling 127.0.0.1 does not disturb the other tests.
    limiter = AuthLimiter(LimiterPolicy(failures_before_delay=2, first_delay=600))
    context = dataclasses.replace(running.context, auth_limiter=limiter)
    server = ImapServer(dataclasses.replace(running.config, starttls_port=0, implicit_tls_port=0), context)
    imap.run(server.start())
    try:
        port = server.addresses()[1][1]
        account = imap.new_account()
        for attempt in range(2):
            client = imaplib.IMAP4_SSL(HOST, port, ssl_context=imap.client_context(), timeout=30)
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                client.login(account.address, f"wrong-{attempt}")
            client.shutdown()
        client = imaplib.IMAP4_SSL(HOST, port, ssl_context=imap.client_context(), timeout=30)
        # From this address even the right password must wait now, and the reply says why (not "wrong password").
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Too many failed logins"):
            client.login(account.address, account.password)
        client.shutdown()
    finally:
        imap.run(server.close())
