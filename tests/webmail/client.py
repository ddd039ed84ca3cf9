"""A patient's browser without the browser: httpx over TLS against a running ``gateway serve``.

It keeps cookies like a browser (``__Host-`` cookies need HTTPS), reads the
CSRF token from each form it fills, and signs in the way a patient does:
password, then the TOTP enrolment or code.
"""

from __future__ import annotations

import html
import re
import ssl
import time
from typing import Any

import httpx
import pyotp

from tests.harness import GatewayProcess

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
SECRET = re.compile(r'<code class="secret">([A-Z2-7]+)</code>')
RECOVERY = re.compile(r"<li><code>([A-Z2-9]{5}-[A-Z2-9]{5})</code></li>")


def base_url(gateway: GatewayProcess) -> str:
    return f"https://localhost:{gateway.ports['http_port']}"


def tls_context(gateway: GatewayProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=gateway.ca_file)


def csrf_of(page: str) -> str:
    match = CSRF.search(page)
    assert match, f"no CSRF field in the page:\n{page[:2000]}"
    return html.unescape(match.group(1))


class PatientBrowser:
    def __init__(self, gateway: GatewayProcess, account: dict[str, Any]) -> None:
        self.gateway = gateway
        self.account = account
        self.http = httpx.AsyncClient(base_url=base_url(gateway), verify=tls_context(gateway), follow_redirects=False,
                                      timeout=30)
        self.totp_secret: str | None = None
        self.recovery_codes: list[str] = []

    async def __aenter__(self) -> PatientBrowser:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.http.aclose()

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path)

    async def submit(self, page_path: str, action: str, fields: dict[str, str]) -> httpx.Response:
        """Load ``page_path``, take its CSRF token, and post ``fields`` to ``action`` as the form would."""
        page = await self.http.get(page_path)
        assert page.status_code == 200, (page_path, page.status_code, page.text[:500])
        return await self.http.post(action, data={"csrf": csrf_of(page.text), **fields})

    async def password(self, password: str | None = None) -> httpx.Response:
        return await self.submit("/connexion", "/connexion", {
            "login": self.account["address"], "password": password or self.account["password"]})

    async def sign_in(self) -> None:
        """Password, then enrol TOTP the first time (keeping the recovery codes) or give the current code."""
        await self.second_factor(await self.password())

    async def second_factor(self, reply: httpx.Response) -> None:
        """After the password: enrol TOTP (first time) or give a code (TOTP, else a recovery code)."""
        assert reply.status_code == 303, reply.text[:1000]
        if reply.headers["location"] == "/connexion/activer":
            page = await self.http.get("/connexion/activer")
            match = SECRET.search(page.text)
            assert match, page.text[:2000]
            self.totp_secret = match.group(1)
            step = int(time.time()) // 30
            done = await self.http.post("/connexion/activer", data={
                "csrf": csrf_of(page.text), "code": pyotp.TOTP(self.totp_secret).at(step * 30)})
            assert done.status_code == 200, done.text[:1000]
            self.recovery_codes = RECOVERY.findall(done.text)
            KNOWN[self._key] = {"secret": self.totp_secret, "codes": list(self.recovery_codes), "step": step}
            return
        assert reply.headers["location"] == "/connexion/code"
        page = await self.http.get("/connexion/code")
        done = await self.http.post("/connexion/code", data={"csrf": csrf_of(page.text), "code": self.next_code()})
        assert done.status_code == 303 and done.headers["location"] == "/", done.text[:1000]

    @property
    def _key(self) -> tuple[str, str]:
        return str(self.gateway.data_dir), str(self.account["address"])

    def next_code(self) -> str:
        """A code the server has not seen: TOTP codes are accepted once (RFC 6238 5.2), so a step after the last
        one used within the accepted window, else one of the recovery codes."""
        known = KNOWN.get(self._key)
        assert known, "this account has a second factor this test run does not know"
        self.totp_secret = known["secret"]
        now = int(time.time()) // 30
        for step in (now, now + 1):
            if step > known["step"]:
                known["step"] = step
                return str(pyotp.TOTP(known["secret"]).at(step * 30))
        return str(known["codes"].pop())


# What each test account enrolled, per gateway data directory: secret, unused recovery codes, last TOTP step used.
KNOWN: dict[tuple[str, str], dict[str, Any]] = {}


def send_as_professional(gateway: GatewayProcess, professional: dict[str, Any], to: str, message: bytes) -> None:
    """Submit ``message`` over SMTP (STARTTLS + AUTH) as a professional, as their mail client would
    (lines end with CRLF on the wire, RFC 5321 2.3.8: the gateway refuses a bare LF)."""
    import re
    import smtplib
    message = re.sub(rb"\r?\n", b"\r\n", message)
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=30) as client:
        client.starttls(context=tls_context_for_ip(gateway))
        client.login(professional["address"], professional["password"])
        refused = client.sendmail(professional["address"], [to], message)
        assert refused == {}, refused


def tls_context_for_ip(gateway: GatewayProcess) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=gateway.ca_file)
    context.check_hostname = False   # we connect to 127.0.0.1; the chain is still verified
    return context


def professional_message(sender: dict[str, Any], to: str, subject: str, *, text: str = "Bonjour,\r\n",
                         html: str | None = None, attachment: tuple[str, bytes] | None = None,
                         extra_headers: dict[str, str] | None = None) -> bytes:
    from email.message import EmailMessage
    from email.utils import format_datetime, make_msgid
    import datetime as dt
    message = EmailMessage()
    message["From"] = f"{sender['display_name']} <{sender['address']}>"
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    message["Message-ID"] = make_msgid(domain="demo.mssante.localhost")
    for name, value in (extra_headers or {}).items():
        message[name] = value
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    if attachment is not None:
        message.add_attachment(attachment[1], maintype="application", subtype="octet-stream", filename=attachment[0])
    return message.as_bytes()


async def wait_for_subject(browser: PatientBrowser, subject: str, timeout: float = 30.0) -> int:
    """The UID of the message with ``subject`` once delivered, read from the inbox page."""
    import asyncio
    deadline = time.monotonic() + timeout
    pattern = re.compile(r'href="/messages/(\d+)">((?:(?!</a>).)*)</a>', re.S)
    while time.monotonic() < deadline:
        page = await browser.get("/")
        for uid, block in pattern.findall(page.text):
            if html.escape(subject) in block:
                return int(uid)
        await asyncio.sleep(0.3)
    raise AssertionError(f"{subject!r} not delivered within {timeout} s")
