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
        """After the password: enrol TOTP (first time) or give the current code."""
        assert reply.status_code == 303, reply.text[:1000]
        if reply.headers["location"] == "/connexion/activer":
            page = await self.http.get("/connexion/activer")
            match = SECRET.search(page.text)
            assert match, page.text[:2000]
            self.totp_secret = match.group(1)
            done = await self.http.post("/connexion/activer", data={
                "csrf": csrf_of(page.text), "code": pyotp.TOTP(self.totp_secret).now()})
            assert done.status_code == 200, done.text[:1000]
            self.recovery_codes = RECOVERY.findall(done.text)
            return
        assert reply.headers["location"] == "/connexion/code"
        assert self.totp_secret, "this account already has a second factor this browser does not know"
        page = await self.http.get("/connexion/code")
        done = await self.http.post("/connexion/code", data={
            "csrf": csrf_of(page.text), "code": self.next_code()})
        assert done.status_code == 303 and done.headers["location"] == "/", done.text[:1000]

    def next_code(self) -> str:
        """A TOTP code not used yet: a code is accepted once (RFC 6238 5.2), so use the next step's."""
        assert self.totp_secret
        totp = pyotp.TOTP(self.totp_secret)
        return totp.at(int(time.time()) + 30)
