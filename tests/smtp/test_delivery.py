"""DATA end to end: streamed, checked, queued durably, delivered into the mail store with our
trace fields; limits enforced while streaming with the session kept in sync; DSN parameters stored."""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator

import pytest

from gateway.queue.store import QueueStore
from tests.smtp.conftest import Transcript, client_context, logged_in, message
from tests.smtp.gateway_thread import GatewayThread

OURS = "demo.mssante.localhost"


def _queue_id(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[1]


def test_delivered_with_trace_fields(gw: GatewayThread) -> None:
    doctor, pharmacist = gw.account("PER", 0), gw.account("PER", 1)
    body = ("Résultats joints.\r\n.ligne qui commence par un point\r\n").encode()
    forged = "Authentication-Results: localhost; auth=pass smtp.auth=someone.else@demo.mssante.localhost\r\n"
    raw = message(doctor.address, pharmacist.address, "Compte rendu", extra=forged).replace(b"Bonjour.\r\n", b"") + body
    with logged_in(gw, doctor.address, doctor.password) as client:
        client.sendmail(doctor.address, [pharmacist.address], raw, mail_options=["BODY=8BITMIME"])
    gw.wait_delivered()
    delivered = [m for m in gw.inbox(pharmacist.address) if b"Subject: Compte rendu" in m]
    assert len(delivered) == 1
    head, _, got_body = delivered[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == f"Return-Path: <{doctor.address}>"
    assert lines[1].startswith("Received: from ")
    received = head.decode().split("\r\nAuthentication-Results:")[0]
    assert "using TLSv1." in received and f"authenticated as {doctor.address}" in received
    assert "with ESMTPSA id " in received and f"for <{pharmacist.address}>" in received
    assert f"Authentication-Results: localhost;\r\n\tauth=pass (TLSv1." in head.decode()
    assert f"smtp.auth={doctor.address}" in head.decode()
    assert "X-MSS-NIL: MSS-GATEWAY-0.1" in lines
    assert "someone.else" not in head.decode()                    # RFC 8601 5: the forged result is gone
    assert got_body == body                                       # dot-unstuffed, 8-bit intact


def test_dsn_parameters_are_stored(gw: GatewayThread) -> None:
    doctor, nurse = gw.account("PER", 0), gw.account("PER", 2)
    with logged_in(gw, doctor.address, doctor.password) as client:
        client.mail(doctor.address, ["RET=HDRS", "ENVID=QQ+2B123"])
        client.rcpt(nurse.address, ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{nurse.address.replace('@', '+40')}"])
        client.rcpt(f"dr.martin@autre-operateur.mssante.localhost", ["NOTIFY=NEVER"])
        code, reply = client.data(message(doctor.address, nurse.address, "DSN"))
    assert code == 250
    queue = QueueStore(gw.db)  # type: ignore[arg-type]
    stored = gw.call(queue.message(_queue_id(reply)))
    assert stored is not None and (stored.ret, stored.envid) == ("HDRS", "QQ+123")
    recipients = gw.call(queue.recipients_of(stored.id))
    assert [(r.address, r.route, r.notify, r.orcpt) for r in recipients] == [
        (nurse.address, "local", "FAILURE,SUCCESS", f"rfc822;{nurse.address}"),
        ("dr.martin@autre-operateur.mssante.localhost", "remote", "NEVER", None),
    ]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gateway = GatewayThread(tmp_path_factory.mktemp("small") / "data", overrides={"smtp": {
        "max_message_size": 64 * 1024, "max_line_length": 1000, "max_header_count": 20, "max_mime_depth": 3}}).start()
    yield gateway
    gateway.stop()


def _session(gw: GatewayThread) -> Transcript:
    doctor = gw.account("PER")
    t = Transcript("127.0.0.1", gw.ports["submissions"], implicit_tls=client_context(gw.ca_file))
    t.s(r"220 .*")
    t.c("EHLO client.example");  t.s(r"250 HELP")

    t.c("AUTH PLAIN " + base64.b64encode(f"\0{doctor.address}\0{doctor.password}".encode()).decode())
    t.s(r"235 .*")
    return t


def _send(t: Transcript, data: bytes, expected: str) -> None:
    t.c(f"MAIL FROM:<claire.medecin@{OURS}>");   t.s(r"250 .*")
    t.c(f"RCPT TO:<marc.pharmacien@{OURS}>");    t.s(r"250 .*")
    t.c("DATA");                                 t.s(r"354 .*")
    t.raw(f"From: <claire.medecin@{OURS}>\r\n".encode() + data + b".\r\n")   # the author is the login (policy)
    t.s(expected)


def test_size_exceeded_while_streaming_keeps_the_session_in_sync(small: GatewayThread) -> None:
    t = _session(small)
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100        # ~100 KB, limit 64 KiB, no SIZE= announced
    _send(t, big, r"552 5\.3\.4 Message size exceeds fixed maximum message size \(65536 octets\)")
    _send(t, b"Subject: small\r\n\r\nok\r\n", r"250 2\.0\.0 OK queued as .*")   # still in sync
    t.close()


def test_long_line_is_refused_after_the_final_dot(small: GatewayThread) -> None:
    t = _session(small)
    _send(t, b"Subject: long\r\n\r\n" + b"y" * 5000 + b"\r\n",
          r"500 5\.5\.2 Message line longer than 1000 octets \(RFC 5321 4\.5\.3\.1\.6\); message refused")
    t.c("NOOP");  t.s(r"250 2\.0\.0 OK")
    t.close()


def test_too_many_header_fields(small: GatewayThread) -> None:
    t = _session(small)
    headers = b"".join(b"X-Field-%d: v\r\n" % n for n in range(25))
    _send(t, headers + b"\r\nbody\r\n", r"554 5\.6\.0 Message has more than 20 header fields")
    t.close()


def test_mime_nesting_bound(small: GatewayThread) -> None:
    def nested(depth: int) -> bytes:
        if depth == 0:
            return b"Content-Type: text/plain\r\n\r\nfeuille\r\n"
        boundary = b"b%d" % depth
        return (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" + boundary + b"\r\n"
                + nested(depth - 1) + b"--" + boundary + b"--\r\n")
    t = _session(small)
    _send(t, b"Subject: deep\r\nMIME-Version: 1.0\r\n" + nested(4), r"554 5\.6\.0 MIME structure nested deeper than 3 levels")
    _send(t, b"Subject: ok\r\nMIME-Version: 1.0\r\n" + nested(3), r"250 2\.0\.0 OK queued as .*")
    t.close()


def test_forwarded_messages_count_in_the_nesting_bound(small: GatewayThread) -> None:
    """A forward inside a forward (message/rfc822, RFC 2046 5.2.1) is a level like a multipart."""
    def forwarded(depth: int) -> bytes:
        if depth == 0:
            return b"Content-Type: text/plain\r\n\r\nmessage d'origine\r\n"
        return b"Content-Type: message/rfc822\r\n\r\nSubject: Tr: niveau %d\r\nMIME-Version: 1.0\r\n" % depth + forwarded(depth - 1)
    t = _session(small)
    _send(t, b"Subject: deep\r\nMIME-Version: 1.0\r\n" + forwarded(4), r"554 5\.6\.0 MIME structure nested deeper than 3 levels")
    _send(t, b"Subject: ok\r\nMIME-Version: 1.0\r\n" + forwarded(3), r"250 2\.0\.0 OK queued as .*")
    t.close()


def test_refused_message_leaves_nothing_in_the_spool(small: GatewayThread) -> None:
    t = _session(small)
    _send(t, b"Subject: big\r\n\r\n" + (b"z" * 900 + b"\r\n") * 100, r"552 5\.3\.4 .*")
    t.close()
    assert list((small.data_dir / "spool" / "incoming").iterdir()) == []


def test_recipient_refused_by_smtplib_has_its_code(gw: GatewayThread) -> None:
    doctor = gw.account("PER")
    with logged_in(gw, doctor.address, doctor.password) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(doctor.address, ["x@gmail.com"], message(doctor.address, "x@gmail.com"))
    assert refused.value.recipients["x@gmail.com"] == (550, "5.7.1 Domain gmail.com is not in the MSSanté trust space".encode())


def test_smtputf8_transaction(gw: GatewayThread) -> None:
    doctor, nurse = gw.account("PER", 0), gw.account("PER", 2)
    t = _session(gw)
    t.c("MAIL FROM:<éloïse@demo.mssante.localhost>")
    t.s(r"553 5\.6\.7 Non-ASCII address needs MAIL FROM \.\.\. SMTPUTF8")
    t.c(f"MAIL FROM:<{doctor.address}> SMTPUTF8 BODY=8BITMIME");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{nurse.address}>");                          t.s(r"250 2\.1\.5 .*")
    t.c("DATA");                                                t.s(r"354 .*")
    t.raw("From: Dr Claire Médecin <claire.medecin@demo.mssante.localhost>\r\nSubject: Résumé UTF-8\r\n\r\nÀ bientôt\r\n.\r\n".encode())
    t.s(r"250 2\.0\.0 OK queued as .*")
    t.close()
    gw.wait_delivered()
    delivered = [m for m in gw.inbox(nurse.address) if "Subject: Résumé UTF-8".encode() in m]
    assert len(delivered) == 1 and b"with UTF8SMTPSA id" in delivered[0]
