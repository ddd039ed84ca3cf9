"""The webmail's sign-in, sessions, CSRF and headers, through a running ``gateway serve``."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import GatewayProcess
from tests.webmail.client import PatientBrowser, base_url, csrf_of, tls_context

pytestmark = pytest.mark.timeout(240)


def patient(gateway: GatewayProcess, index: int = 0) -> dict[str, object]:
    return gateway.account("PAT", index)


async def test_pages_carry_the_security_headers(shared_gateway: GatewayProcess) -> None:
    async with PatientBrowser(shared_gateway, patient(shared_gateway)) as browser:
        page = await browser.get("/connexion")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["strict-transport-security"].startswith("max-age=")
    assert page.headers["cache-control"] == "no-store"
    assert '<html lang="fr">' in page.text and "Connexion à votre messagerie santé" in page.text
    assert 'href="#contenu"' in page.text and '<main id="contenu"' in page.text


async def test_fhir_api_still_answers_beside_the_webmail(shared_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=base_url(shared_gateway), verify=tls_context(shared_gateway)) as http:
        metadata = await http.get("/fhir/metadata")
        home = await http.get("/")
    assert metadata.status_code == 200 and metadata.json()["resourceType"] == "CapabilityStatement"
    assert metadata.headers["strict-transport-security"].startswith("max-age=")
    assert metadata.headers["x-content-type-options"] == "nosniff"
    assert home.status_code == 303 and home.headers["location"] == "/connexion"


async def test_enrol_totp_then_sign_in_with_a_code(shared_gateway: GatewayProcess) -> None:
    account = patient(shared_gateway)
    async with PatientBrowser(shared_gateway, account) as browser:
        await browser.sign_in()
        assert len(browser.recovery_codes) == 10
        inbox = await browser.get("/")
        assert inbox.status_code == 200 and "Messages" in inbox.text
    async with PatientBrowser(shared_gateway, account) as second:
        reply = await second.password()
        assert reply.status_code == 303 and reply.headers["location"] == "/connexion/code"
        half_signed = second.http.cookies.get("__Host-mss-session")
        assert (await second.get("/")).headers["location"] == "/connexion"     # password alone opens nothing
        await second.second_factor(reply)
        assert second.http.cookies.get("__Host-mss-session") != half_signed     # id rotated at sign-in
        assert (await second.get("/")).status_code == 200


async def test_session_cookie_is_secure_httponly_strict(shared_gateway: GatewayProcess) -> None:
    async with PatientBrowser(shared_gateway, patient(shared_gateway, 1)) as browser:
        reply = await browser.password()
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("__Host-mss-session=")
    lowered = cookie.lower()
    assert "secure" in lowered and "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered


async def test_wrong_password_refused_in_french(shared_gateway: GatewayProcess) -> None:
    async with PatientBrowser(shared_gateway, patient(shared_gateway, 1)) as browser:
        reply = await browser.password("not-the-password")
    assert reply.status_code == 401
    assert "L&#39;adresse ou le mot de passe est incorrect." in reply.text
    assert "__Host-mss-session" not in reply.headers.get("set-cookie", "")


async def test_post_without_csrf_token_refused(shared_gateway: GatewayProcess) -> None:
    account = patient(shared_gateway, 1)
    async with PatientBrowser(shared_gateway, account) as browser:
        await browser.get("/connexion")   # has its pre-session cookie, but does not send the token
        missing = await browser.http.post("/connexion", data={"login": account["address"], "password": account["password"]})
        wrong = await browser.http.post("/connexion", data={"login": account["address"], "password": account["password"],
                                                            "csrf": "0" * 64})
    for reply in (missing, wrong):
        assert reply.status_code == 403
        assert "__Host-mss-session" not in reply.headers.get("set-cookie", "")


async def test_token_of_another_visitor_refused(shared_gateway: GatewayProcess) -> None:
    account = patient(shared_gateway, 1)
    async with PatientBrowser(shared_gateway, account) as attacker, PatientBrowser(shared_gateway, account) as victim:
        token = csrf_of((await attacker.get("/connexion")).text)
        await victim.get("/connexion")
        reply = await victim.http.post("/connexion", data={"csrf": token, "login": account["address"],
                                                           "password": account["password"]})
    assert reply.status_code == 403


async def test_sign_in_guessing_is_throttled(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wrong passwords in a row lock the login (and the source), even against the right password then."""
    gateway = GatewayProcess(tmp_path_factory.mktemp("throttle") / "data",
                             extra_env={"GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "3"})
    gateway.start()
    try:
        account = gateway.account("PAT")
        async with PatientBrowser(gateway, account) as browser:
            statuses = [(await browser.password(f"guess-{n}")).status_code for n in range(3)]
            assert statuses == [401, 401, 401]
            locked = await browser.password()          # the right password, too late
            assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
            assert "Trop de tentatives" in locked.text
            assert "__Host-mss-session" not in locked.headers.get("set-cookie", "")
        export = gateway.data_dir.parent / "audit.jsonl"
        gateway.cli("audit", "export", str(export), "--patient", account["owner"], check=True)
        refusals = [line for line in export.read_text().splitlines() if "webmail_sign_in_refused" in line]
        assert len(refusals) == 4 and "throttled" in refusals[-1]     # every refusal audited, the lockout too
    finally:
        gateway.stop()
