"""Refusals at the webmail door are in the audit log, from the attacker's side, through a running ``gateway serve``.

A signed-in patient asking for another patient's message by its id gets 404
and a ``door_refused`` entry naming their mailbox, their address and the
reason; another patient's document gets 404 and the record's own
``access_refused`` entry (written by the record's access policy, not doubled
by the door); a forged CSRF token gets 403 and is audited, signed in or not; a
made-up session cookie is audited, an anonymous visit to the sign-in page is
not; a reply the mail policy refuses (the patient-first rule) is audited as
SMTP's refusals are. The chain verifies after.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import uuid
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import httpx
import pytest

from tests.dmp_bridge.filing_world import SAMPLES, sample
from tests.harness import GatewayProcess
from tests.webmail.client import (
    PatientBrowser, base_url, csrf_of, professional_message, send_as_professional, tls_context, wait_for_subject,
)
from tests.webmail.test_record_pages import documents_of

pytestmark = pytest.mark.timeout(300)

NOSY = "127.0.0.31"          # the patient who changes ids in the address bar
FORGER = "127.0.0.32"        # forged CSRF tokens and session cookies, signed in or not
VISITOR = "127.0.0.33"       # an ordinary anonymous visit


class BrowserFrom(PatientBrowser):
    """A patient's browser connecting from a chosen loopback address (entries are told apart by it)."""

    def __init__(self, gateway: GatewayProcess, account: dict[str, Any], source: str) -> None:
        super().__init__(gateway, account)
        transport = httpx.AsyncHTTPTransport(verify=tls_context(gateway), local_address=source)
        self.http = httpx.AsyncClient(base_url=base_url(gateway), transport=transport, follow_redirects=False,
                                      timeout=30)


def entries(gateway: GatewayProcess, event: str, source: str) -> list[dict[str, Any]]:
    listed = gateway.cli("audit", "list", "--event", event, "--json", "--limit", "1000", check=True)
    return sorted((entry for entry in json.loads(listed.stdout) if entry["source"]["ip"] == source),
                  key=lambda entry: entry["seq"])


def file_vaccination_note(gateway: GatewayProcess) -> None:
    """The lab sends the vaccination note to its patient (the first demo patient) over SMTP; serve files it."""
    lab, patient = gateway.account("APP"), gateway.account("PAT")
    message = EmailMessage()
    message["From"], message["To"] = lab["address"], patient["address"]
    message["Subject"], message["Message-ID"] = "Compte rendu", make_msgid(domain="labo.test")
    message.set_content("Veuillez trouver ci-joint le compte rendu.\n")
    message.add_attachment(sample("VAC-NOTE_2023.01.xml"), maintype="text", subtype="xml", filename="note.xml")
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], local_hostname="labo.test", timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=gateway.ca_file))
        smtp.login(lab["address"], lab["password"])
        smtp.send_message(message, from_addr=lab["address"], to_addrs=[patient["address"]])


@pytest.fixture(scope="module")
def gateway(shared_gateway: GatewayProcess) -> GatewayProcess:
    return shared_gateway


async def test_another_patients_message_by_id_is_refused_and_audited(gateway: GatewayProcess) -> None:
    doctor, owner, nosy = gateway.account("PER"), gateway.account("PAT"), gateway.account("PAT", 1)
    titles = [f"Résultats {uuid.uuid4().hex[:8]}" for _ in range(2)]
    for title in titles:
        send_as_professional(gateway, doctor, owner["address"], professional_message(doctor, owner["address"], title))
    async with PatientBrowser(gateway, owner) as browser:
        await browser.sign_in()
        theirs = [await wait_for_subject(browser, title) for title in titles]
    async with BrowserFrom(gateway, nosy, NOSY) as browser:
        await browser.sign_in()
        mine = await browser.get("/")
        assert mine.status_code == 200
        uid = max(theirs)                                     # the nosy patient has no message with this id
        for path in (f"/messages/{uid}", f"/messages/{uid}/pieces/1"):
            page = await browser.get(path)
            assert page.status_code == 404 and titles[-1] not in page.text, path
    # The second refusal is the same one (GET, not yours, 404) within the minute: folded into the first entry.
    [entry] = entries(gateway, "door_refused", NOSY)
    assert (entry["details"]["reason"], entry["details"]["detail"]) == ("not-yours", f"GET /messages/{uid}"), entry
    assert (entry["actor"]["kind"], entry["actor"]["id"], entry["source"]["door"]) == (
        "mailbox", nosy["address"], "webmail")
    assert entry["details"]["reply"].startswith("404")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
async def test_another_patients_document_is_refused_and_audited_once(gateway: GatewayProcess) -> None:
    file_vaccination_note(gateway)
    owner, nosy = gateway.account("PAT"), gateway.account("PAT", 1)
    async with PatientBrowser(gateway, owner) as browser:
        await browser.sign_in()
        document_id = (await documents_of(browser, 1))["NOTE DE VACCINATION"]
    before = len(entries(gateway, "door_refused", NOSY))
    async with BrowserFrom(gateway, nosy, NOSY) as browser:
        await browser.sign_in()
        for suffix in ("", "/pdf", "/telecharger"):
            assert (await browser.get(f"/documents/{document_id}{suffix}")).status_code == 404
        hide = await browser.submit("/documents", f"/documents/{document_id}/masquer", {})
        assert hide.status_code == 404
    # Reading is refused by the record's access policy, which writes its own access_refused entries ...
    record = [e for e in entries(gateway, "access_refused", NOSY) if e["source"]["door"] == "webmail"]
    assert len(record) == 3 and all(e["actor"]["kind"] == "patient" for e in record), record
    # ... so the door adds none for them; the hiding control (no entry of its own when refused) is the door's.
    door = entries(gateway, "door_refused", NOSY)[before:]
    assert [(e["details"]["reason"], e["details"]["detail"]) for e in door] == [
        ("not-yours", f"POST /documents/{document_id}/masquer")], door


async def test_forged_csrf_tokens_and_session_cookies_are_refused_and_audited(gateway: GatewayProcess) -> None:
    patient, doctor = gateway.account("PAT", 1), gateway.account("PER")
    async with BrowserFrom(gateway, patient, FORGER) as browser:
        anonymous = await browser.http.post("/connexion", data={
            "csrf": "forged", "login": patient["address"], "password": patient["password"]})
        assert anonymous.status_code == 403
        await browser.sign_in()
        forged = await browser.http.post(f"/conversations/{doctor['address']}/repondre", data={
            "csrf": "A" * 43, "text": "Bonjour"})
        assert forged.status_code == 403
    async with BrowserFrom(gateway, patient, FORGER) as stranger:
        page = await stranger.http.get("/documents", headers={"Cookie": "__Host-mss-session=made-up-session-token"})
        assert page.status_code == 303 and page.headers["location"] == "/connexion"
    refused = entries(gateway, "door_refused", FORGER)
    seen = [(e["details"]["reason"], e["actor"]["kind"], e["actor"]["id"], e["details"]["detail"]) for e in refused]
    assert seen == [
        ("csrf", "unauthenticated", FORGER, "POST /connexion"),
        ("csrf", "mailbox", patient["address"], f"POST /conversations/{doctor['address']}/repondre"),
        ("invalid-session", "unauthenticated", FORGER, "GET /documents"),
    ], seen
    assert refused[0]["details"]["reply"].startswith("403")


async def test_an_ordinary_visit_is_not_a_refusal(gateway: GatewayProcess) -> None:
    async with BrowserFrom(gateway, gateway.account("PAT"), VISITOR) as visitor:
        assert (await visitor.get("/")).status_code == 303                 # no cookie at all: off to sign in
        assert (await visitor.get("/connexion")).status_code == 200
        assert (await visitor.get("/no-such-page")).status_code == 404
    assert entries(gateway, "door_refused", VISITOR) == []


async def test_a_reply_the_mail_policy_refuses_is_audited(gateway: GatewayProcess) -> None:
    patient, nurse = gateway.account("PAT", 1), gateway.account("PER", 2)
    async with BrowserFrom(gateway, patient, NOSY) as browser:
        await browser.sign_in()
        inbox = await browser.get("/")
        forced = await browser.http.post(f"/conversations/{nurse['address']}/repondre", data={
            "csrf": csrf_of(inbox.text), "text": "Bonjour, je voudrais un rendez-vous."})
        assert forced.status_code == 403
    [entry] = [e for e in entries(gateway, "door_refused", NOSY) if e["details"]["reason"] == "mail-policy"]
    assert entry["actor"]["id"] == patient["address"] and "5.7.1" in entry["details"]["reply"], entry


def test_the_chain_verifies_after_the_refusals(gateway: GatewayProcess) -> None:
    assert gateway.cli("audit", "verify").returncode == 0
