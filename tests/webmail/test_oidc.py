"""Sign-in through an OpenID Connect provider (authorization code + PKCE), against a running ``gateway serve``
configured with a fake provider run by the test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.harness import GatewayProcess
from tests.webmail.client import PatientBrowser
from tests.webmail.fake_oidc import FakeProvider

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def provider_and_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeProvider, GatewayProcess]]:
    provider = FakeProvider()
    provider.run_in_thread()
    gateway = GatewayProcess(tmp_path_factory.mktemp("oidc") / "data", extra_env={
        "GATEWAY_WEBMAIL_OIDC_ISSUER": provider.issuer, "GATEWAY_WEBMAIL_OIDC_CLIENT_ID": provider.client_id,
        # these tests are refused on purpose, all from 127.0.0.1: keep the sign-in limiter out of their way
        "GATEWAY_AUTH_FAILURES_BEFORE_DELAY": "100", "GATEWAY_AUTH_SOURCE_FAILURES_BEFORE_DELAY": "10000"})
    gateway.start()
    try:
        yield provider, gateway
    finally:
        gateway.stop()
        provider.stop_thread()


async def through_provider(browser: PatientBrowser) -> tuple[httpx.Response, str]:
    """Start at the webmail, pass the provider's (automatic) consent; the provider's redirect back."""
    start = await browser.get("/connexion/oidc")
    assert start.status_code == 303, start.text[:500]
    authorize = start.headers["location"]
    params = parse_qs(urlparse(authorize).query)
    assert params["code_challenge_method"] == ["S256"] and len(params["code_challenge"][0]) == 43
    assert params["nonce"][0] and params["state"][0]
    async with httpx.AsyncClient() as outside:
        consent = await outside.get(authorize)
    assert consent.status_code == 302
    return consent, consent.headers["location"]


async def test_sign_in_with_the_provider(provider_and_gateway: tuple[FakeProvider, GatewayProcess]) -> None:
    provider, gateway = provider_and_gateway
    patient = gateway.account("PAT")
    provider.subject_ins, provider.tamper = patient["owner"], {}
    async with PatientBrowser(gateway, patient) as browser:
        assert "/connexion/oidc" in (await browser.get("/connexion")).text
        _, back = await through_provider(browser)
        arrived = await browser.get(urlparse(back)._replace(scheme="", netloc="").geturl())
        assert arrived.status_code == 200 and 'http-equiv="refresh"' in arrived.text
        assert (await browser.get("/")).status_code == 200
    assert provider.token_requests[-1]["code_verifier"] and provider.token_requests[-1]["grant_type"] == "authorization_code"


async def test_callback_replayed_or_from_another_browser_is_refused(
        provider_and_gateway: tuple[FakeProvider, GatewayProcess]) -> None:
    provider, gateway = provider_and_gateway
    patient = gateway.account("PAT")
    provider.subject_ins, provider.tamper = patient["owner"], {}
    async with PatientBrowser(gateway, patient) as victim, PatientBrowser(gateway, patient) as attacker:
        _, back = await through_provider(victim)
        path = urlparse(back)._replace(scheme="", netloc="").geturl()
        stolen = await attacker.get(path)                          # no state cookie in the attacker's browser
        assert stolen.status_code == 401 and (await attacker.get("/")).status_code == 303
        assert (await victim.get(path)).status_code == 200
        replay = await victim.get(path)                            # the state cookie was used up
        assert replay.status_code == 401


@pytest.mark.parametrize("tamper, why", [
    ({"nonce": "someone-elses"}, "nonce does not match"),
    ({"aud": "another-client"}, "InvalidAudienceError"),
    ({"iss": "http://127.0.0.1:1"}, "InvalidIssuerError"),
    ({"exp": 1000}, "ExpiredSignatureError"),
    ({"ins": "178012345678912"}, "no active patient space"),
])
async def test_untrustworthy_id_tokens_are_refused(provider_and_gateway: tuple[FakeProvider, GatewayProcess],
                                                   tamper: dict[str, Any], why: str) -> None:
    provider, gateway = provider_and_gateway
    patient = gateway.account("PAT", 1)
    provider.subject_ins, provider.tamper = patient["owner"], tamper
    async with PatientBrowser(gateway, patient) as browser:
        _, back = await through_provider(browser)
        answer = await browser.get(urlparse(back)._replace(scheme="", netloc="").geturl())
        assert answer.status_code == 401, why
        assert "__Host-mss-session" not in answer.headers.get("set-cookie", "")
        assert (await browser.get("/")).status_code == 303
    provider.tamper = {}
    export = gateway.data_dir.parent / f"audit-{why.split()[0]}.jsonl"
    gateway.cli("audit", "export", str(export), check=True)
    last_refusal = [line for line in export.read_text().splitlines() if "webmail_sign_in_refused" in line][-1]
    assert why in last_refusal          # refused for the right reason, and audited
