"""My documents, the access history and my settings, through a running ``gateway serve`` (HTTPS, real sign-in):
documents filed over SMTP by serve's own worker, read by a professional over the FHIR API, controlled by the patient."""

from __future__ import annotations

import asyncio
import html
import re
import smtplib
import ssl
import time
import zipfile
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import make_msgid
from io import BytesIO

import httpx
import pytest

from tests.dmp_bridge.filing_world import SAMPLES, sample
from tests.harness import GatewayProcess
from tests.webmail.client import PatientBrowser, base_url, csrf_of, tls_context

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")]

SAMPLE_FILES = ("VAC-NOTE_2023.01.xml", "BIO-CR-BIO_2021.01_Microbiologie_V1.xml", "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml")
DOCUMENT_LINK = re.compile(r'<a href="/documents/(\d+)">\s*<span class="document-list__title">([^<]*)</span>')
HOSTILE_CDA_MARK = "HOSTILE-CDA"


def file_documents(gateway: GatewayProcess, *attachments: tuple[str, bytes]) -> None:
    """The lab sends reports to the patient over SMTP submission; serve's worker files them."""
    lab, patient = gateway.account("APP"), gateway.account("PAT")
    message = EmailMessage()
    message["From"], message["To"] = lab["address"], patient["address"]
    message["Subject"], message["Message-ID"] = "Comptes rendus", make_msgid(domain="labo.test")
    message.set_content("Veuillez trouver ci-joint les comptes rendus.\n")
    for name, content in attachments:
        message.add_attachment(content, maintype="text", subtype="xml", filename=name)
    with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], local_hostname="labo.test", timeout=30) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=gateway.ca_file))
        smtp.login(lab["address"], lab["password"])
        smtp.send_message(message, from_addr=lab["address"], to_addrs=[patient["address"]])


def hostile_cda() -> bytes:
    """The vaccination note as a new document whose narrative carries scripts, handlers and links."""
    cda = sample("VAC-NOTE_2023.01.xml").decode("utf-8")
    cda = cda.replace('<id root="1.2.250.1.213.1.1.1.46.2023.1.1"/>', '<id root="1.2.250.1.999.66.1"/>', 1)
    cda = cda.replace('<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', '<setId root="1.2.250.1.999.66"/>', 1)
    cda = cda.replace("<title>NOTE DE VACCINATION</title>", "<title>Note piégée</title>", 1)
    payload = (f'<paragraph onclick="alert(1)">{HOSTILE_CDA_MARK}</paragraph>'
               '<xhtml:script xmlns:xhtml="http://www.w3.org/1999/xhtml">document.title="pwned"</xhtml:script>'
               '<linkHtml href="javascript:alert(2)">cliquez</linkHtml>'
               '<xhtml:img xmlns:xhtml="http://www.w3.org/1999/xhtml" src="x" onerror="alert(3)"/>')
    return cda.replace("<text>", "<text>" + payload, 1).encode("utf-8")


async def documents_of(browser: PatientBrowser, expected: int) -> dict[str, str]:
    """Title -> id of the listed documents (the newest of a title), once ``expected`` are listed."""
    deadline = time.monotonic() + 60
    while True:
        page = await browser.get("/documents")
        assert page.status_code == 200, page.text[:500]
        links = DOCUMENT_LINK.findall(page.text)
        if len(links) >= expected or time.monotonic() > deadline:
            assert len(links) == expected, links
            found: dict[str, str] = {}
            for doc_id, title in links:  # newest first
                found.setdefault(html.unescape(title.strip()), doc_id)
            return found
        await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def filed(shared_gateway: GatewayProcess) -> GatewayProcess:
    file_documents(shared_gateway, *((name, sample(name)) for name in SAMPLE_FILES), ("hostile.xml", hostile_cda()))
    file_documents(shared_gateway, ("BIO_V2.xml", sample("BIO-CR-BIO_2021.01_Microbiologie_V2.xml")))
    return shared_gateway


SIGNED_IN: dict[str, httpx.Cookies] = {}  # one sign-in per account and module (a TOTP code is accepted once)


async def signed_in(browser: PatientBrowser) -> PatientBrowser:
    address = str(browser.account["address"])
    if address in SIGNED_IN:
        browser.http.cookies = httpx.Cookies(SIGNED_IN[address])
    else:
        await browser.sign_in()
        SIGNED_IN[address] = httpx.Cookies(browser.http.cookies)
    return browser


@pytest.fixture
async def browser(filed: GatewayProcess) -> AsyncIterator[PatientBrowser]:
    async with PatientBrowser(filed, filed.account("PAT")) as patient:
        yield await signed_in(patient)


def doctor_client(gateway: GatewayProcess) -> httpx.AsyncClient:
    doctor = gateway.account("PER")
    return httpx.AsyncClient(base_url=base_url(gateway) + "/fhir", verify=tls_context(gateway),
                             auth=(doctor["address"], doctor["password"]), timeout=30)


async def test_documents_are_listed_opened_and_downloaded_safely(browser: PatientBrowser) -> None:
    found = await documents_of(browser, 5)
    assert len(found) == 4, found
    listing = (await browser.get("/documents")).text
    assert "Remplacé par une version plus récente" in listing
    imaging = next(doc_id for title, doc_id in found.items() if title.startswith("CR d"))
    page = await browser.get(f"/documents/{imaging}")
    assert page.status_code == 200 and f'src="/documents/{imaging}/pdf"' in page.text
    pdf = await browser.get(f"/documents/{imaging}/pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF-")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.headers["x-content-type-options"] == "nosniff"
    assert pdf.headers["content-security-policy"].startswith("sandbox") and "inline" in pdf.headers["content-disposition"]
    download = await browser.get(f"/documents/{imaging}/telecharger")
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.headers["content-type"] == "application/octet-stream" and b"ClinicalDocument" in download.content
    vaccination = found["NOTE DE VACCINATION"]
    cda = (await browser.get(f"/documents/{vaccination}")).text
    assert "<table>" in cda and "<h2>Note de vaccination</h2>" in cda


async def test_a_script_in_a_filed_document_is_inert(browser: PatientBrowser) -> None:
    found = await documents_of(browser, 5)
    pages = [(await browser.get(f"/documents/{doc_id}")).text for doc_id in found.values()]
    hostile = next(page for page in pages if HOSTILE_CDA_MARK in page)
    assert "onclick" not in hostile and "<script>document" not in hostile.replace("&lt;", "")
    assert "javascript:" not in hostile and "onerror" not in hostile and 'src="x"' not in hostile


async def test_another_patients_document_is_not_found(filed: GatewayProcess, browser: PatientBrowser) -> None:
    found = await documents_of(browser, 5)
    async with PatientBrowser(filed, filed.account("PAT", 1)) as other:
        await signed_in(other)
        for doc_id in found.values():
            for suffix in ("", "/pdf", "/telecharger"):
                assert (await other.get(f"/documents/{doc_id}{suffix}")).status_code == 404
        assert "document-list__item" not in (await other.get("/documents")).text
        hide = await other.submit("/documents", f"/documents/{next(iter(found.values()))}/masquer", {})
        assert hide.status_code == 404


async def test_the_history_grows_when_a_professional_reads(filed: GatewayProcess, browser: PatientBrowser) -> None:
    found = await documents_of(browser, 5)
    async with doctor_client(filed) as fhir:
        assert (await fhir.get(f"/Binary/{found['NOTE DE VACCINATION']}")).status_code == 200
    history = html.unescape((await browser.get("/historique")).text)
    assert "médecin, a consulté votre document « NOTE DE VACCINATION » le " in history
    assert " a ajouté votre document « " in history


async def test_hiding_a_document_refuses_the_professionals_read(filed: GatewayProcess, browser: PatientBrowser) -> None:
    found = await documents_of(browser, 5)
    target = found["NOTE DE VACCINATION"]
    unauthorised = await browser.http.post(f"/documents/{target}/masquer", data={"csrf": "forged"})
    assert unauthorised.status_code == 403
    hidden = await browser.submit(f"/documents/{target}", f"/documents/{target}/masquer", {})
    assert hidden.status_code == 303
    assert "désormais masqué aux professionnels" in (await browser.get(hidden.headers["location"])).text
    async with doctor_client(filed) as fhir:
        assert (await fhir.get(f"/Binary/{target}")).status_code == 404
    assert "Vous avez masqué votre document « NOTE DE VACCINATION »" in (await browser.get("/historique")).text
    shown = await browser.submit(f"/documents/{target}", f"/documents/{target}/afficher", {})
    assert shown.status_code == 303
    async with doctor_client(filed) as fhir:
        assert (await fhir.get(f"/Binary/{target}")).status_code == 200


async def test_export_is_a_zip_of_messages_documents_and_history(browser: PatientBrowser) -> None:
    await documents_of(browser, 5)
    page = await browser.get("/reglages")
    response = await browser.http.post("/reglages/export", data={"csrf": csrf_of(page.text)})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(BytesIO(response.content)).namelist()
    assert any(n.startswith("messages/INBOX/") for n in names) and "historique.txt" in names
    assert len([n for n in names if n.startswith("documents/") and not n.endswith(".csv")]) == 5
    assert "Vous avez exporté votre dossier et vos messages" in (await browser.get("/historique")).text


@pytest.mark.parametrize("path", [
    "/?page=²", "/documents?page=²", "/documents?du=²&au=2026-13-45&type=%00", "/historique?avant=²",
    "/historique?avant=٣", "/documents/²", "/documents/٣/pdf", "/messages/٣",
])
async def test_hostile_query_values_are_answered_not_crashed(browser: PatientBrowser, path: str) -> None:
    """Digits that are not ASCII, impossible dates and control characters in a page's parameters: a page or
    a 4xx, never a 500, and the webmail goes on serving."""
    answer = await browser.get(path)
    assert answer.status_code < 500, (path, answer.status_code)
    assert (await browser.get("/documents")).status_code == 200
