"""SMTP smuggling (CVE-2023-51764 family), from the attacker's side, on every door of ``gateway serve``.

Only ``<CRLF>.<CRLF>`` ends DATA (RFC 5321 4.1.1.4). A client that ends a message with
``<LF>.<CRLF>`` (or any other look-alike) and appends a second transaction must not get that
second transaction taken for another message: the look-alike is message content, and a bare
LF or bare CR anywhere in DATA makes the whole message refused (RFC 5321 2.3.8), with
``550 5.5.2`` as Postfix 3.9 answers with ``smtpd_forbid_bare_newline = reject``. The session
stays in step: the one reply comes after the real end of data, and the next command is answered.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.queue.smtp_client import DotStuffer

from tests.harness import GatewayProcess
from tests.smtp.doors import DOORS, inbox, open_door, sender_on, start_transaction, wait_for_subject

# The end-of-data look-alikes: what the attacker puts where <CRLF>.<CRLF> belongs.
LOOK_ALIKES = {
    "lf-dot-crlf": b"\n.\r\n",
    "lf-dot-lf": b"\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-lf": b"\r.\n",
    "lf-dot-cr": b"\n.\r",
    "lf-cr-dot-crlf": b"\n\r.\r\n",
}
REFUSED = r"550 5\.5\.2 Message refused: bare <(LF|CR)> received \(RFC 5321 2\.3\.8.*"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    from tests.smtp.doors import doors_gateway
    gateway = doors_gateway(tmp_path_factory.mktemp("smuggling") / "data")
    yield gateway
    gateway.stop()


def _smuggled(gw: GatewayProcess, door: str, marker: str) -> bytes:
    """A second, complete transaction hidden after the look-alike."""
    sender, _ = sender_on(gw, door)
    marc = gw.account("PER", 1)["address"]
    return (f"MAIL FROM:<{sender}>\r\nRCPT TO:<{marc}>\r\nDATA\r\n"
            f"From: <{sender}>\r\nTo: <{marc}>\r\nSubject: smuggled {marker}\r\n\r\nforged\r\n").encode()


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("variant", list(LOOK_ALIKES))
def test_end_of_data_look_alike_never_ends_the_message(gw: GatewayProcess, door: str, variant: str) -> None:
    marc = gw.account("PER", 1)
    marker = f"{door}-{variant}"
    t = start_transaction(gw, door, marc["address"])
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"From: <{sender_on(gw, door)[0]}>\r\nSubject: first {marker}\r\n\r\nline one".encode()
          + LOOK_ALIKES[variant] + _smuggled(gw, door, marker) + b"\r\n.\r\n")
    t.s(REFUSED)                                      # one reply, after the real end: nothing was taken as commands
    t.c("NOOP");  t.s(r"250 2\.0\.0 OK")               # in step: the next reply answers the next command
    t.c("QUIT");  t.s(r"221 2\.0\.0 .*")
    t.close()
    subjects = [m["Subject"] for m in inbox(gw, marc)]
    assert f"smuggled {marker}" not in subjects and f"first {marker}" not in subjects, subjects


@pytest.mark.parametrize("door", DOORS)
def test_pipelined_smuggling_attempt(gw: GatewayProcess, door: str) -> None:
    """PIPELINING (RFC 2920): the whole attempt in one write, as an attacker's script sends it."""
    marc = gw.account("PER", 1)
    sender, cert = sender_on(gw, door)
    t = open_door(gw, door, cert=cert)
    if door != "smtp_relay_port":
        from tests.smtp.doors import login
        login(t, gw.account("PER", 0))
    t.raw(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{marc['address']}>\r\nDATA\r\n".encode()
          + f"Subject: pipelined {door}\r\n\r\nhello".encode() + b"\n.\r\n"
          + _smuggled(gw, door, f"pipelined {door}") + b"\r\n.\r\nQUIT\r\n")
    t.s(r"250 2\.1\.0 .*")
    t.s(r"250 2\.1\.5 .*")
    t.s(r"354 .*")
    t.s(REFUSED)
    t.s(r"221 2\.0\.0 .*")
    t.close()
    assert f"smuggled pipelined {door}" not in [m["Subject"] for m in inbox(gw, marc)]


@pytest.mark.parametrize("door", DOORS)
def test_bare_cr_or_lf_inside_a_message_is_refused_and_the_session_goes_on(gw: GatewayProcess, door: str) -> None:
    """A bare LF in a line, then a clean message in the same session: the first is refused, the second delivered."""
    marc = gw.account("PER", 1)
    sender, _ = sender_on(gw, door)
    t = start_transaction(gw, door, marc["address"])
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"Subject: bare lf {door}\r\n\r\nune ligne\nune autre\r\n.\r\n".encode())
    t.s(r"550 5\.5\.2 Message refused: bare <LF> received .*")
    t.c(f"MAIL FROM:<{sender}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{marc['address']}>");  t.s(r"250 2\.1\.5 .*")
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"Subject: bare cr {door}\r\n\r\nune ligne\rune autre\r\n.\r\n".encode())
    t.s(r"550 5\.5\.2 Message refused: bare <CR> received .*")
    t.c(f"MAIL FROM:<{sender}>");  t.s(r"250 2\.1\.0 .*")
    t.c(f"RCPT TO:<{marc['address']}>");  t.s(r"250 2\.1\.5 .*")
    t.c("DATA");  t.s(r"354 .*")
    t.raw(f"From: <{sender}>\r\nSubject: clean {door}\r\n\r\n..dot-stuffed line\r\nfin\r\n.\r\n".encode())
    t.s(r"250 2\.0\.0 .*")
    t.c("QUIT");  t.s(r"221 2\.0\.0 .*")
    t.close()
    clean = wait_for_subject(gw, marc, f"clean {door}")
    content = clean.get_content()
    assert ".dot-stuffed line" in content and "..dot-stuffed" not in content     # RFC 5321 4.5.2 unstuffing
    subjects = [m["Subject"] for m in inbox(gw, marc)]
    assert f"bare lf {door}" not in subjects and f"bare cr {door}" not in subjects


@pytest.mark.parametrize("door", DOORS)
def test_bdat_is_not_offered(gw: GatewayProcess, door: str) -> None:
    """No CHUNKING (RFC 3030): BDAT, which has its own end-of-data rules, is not a way in."""
    _, cert = sender_on(gw, door)
    t = open_door(gw, door, cert=cert)
    t.c("EHLO probe.example");  lines = t.s(r"250 .*")
    assert not any("CHUNKING" in line for line in lines)
    t.c("BDAT 10 LAST");  t.s(r"500 5\.5\.1 Command not recognized: BDAT")
    t.close()


@given(st.binary(max_size=200).map(lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n").replace(b"z", b".")),
       st.integers(min_value=0, max_value=200))
def test_what_we_send_has_no_bare_cr_or_lf_and_one_end_of_data(body: bytes, cut: int) -> None:
    """Outbound (gateway.queue.smtp_client.DotStuffer): whatever the spooled bytes and however they are
    chunked, peers get CRLF line ends only and exactly one <CRLF>.<CRLF>, at the end."""
    def send(chunks: list[bytes]) -> bytes:
        stuffer = DotStuffer()
        return b"".join(stuffer.feed(chunk) for chunk in chunks) + stuffer.end()

    whole = send([body])
    assert send([body[:cut], body[cut:]]) == whole
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", whole) is None
    after_data_command = b"\r\n" + whole                # DATA's own CRLF precedes the content
    assert after_data_command.find(b"\r\n.\r\n") == len(after_data_command) - 5


@pytest.mark.parametrize("door", DOORS)
def test_bare_cr_in_the_ehlo_argument_is_refused(gw: GatewayProcess, door: str) -> None:
    """The EHLO argument is written into the Received field (RFC 5321 4.4): a bare CR in it would start a
    forged header line for the many parsers that take CR alone as a line break."""
    from tests.smtp.conftest import Transcript
    from tests.smtp.doors import tls_client
    _, cert = sender_on(gw, door)
    implicit = tls_client(gw, cert) if door == "smtp_submissions_port" else None
    t = Transcript("127.0.0.1", gw.ports[door], implicit_tls=implicit)
    t.s(r"220 .*")
    t.raw(b"EHLO probe.example\rX-Injected: yes\r\n")
    t.s(r"501 5\.5\.4 Syntax error in parameters: EHLO argument holds a control character")
    t.raw(b"HELO probe.example\x00\r\n")
    t.s(r"501 5\.5\.4 Syntax error in parameters: HELO argument holds a control character")
    t.c("EHLO probe.example");  t.s(r"250 .*")
    t.close()
