"""The patient's record in a real browser (Playwright + Debian chromium) against a running ``gateway serve``:
open a filed PDF and a CDA; the access history grows after a professional reads through the FHIR API; hide a
document and the professional's read is refused; block a professional; refuse emergency access and see it
refused; export; close the space. A script in a filed document does not run. axe-core finds no serious or
critical violation; screenshots at 1280 px and 360 px (tests/webmail/screenshots/record-*)."""

from __future__ import annotations

import time
import zipfile
from typing import Any
from urllib.parse import urlparse

import httpx
import pyotp
import pytest
from playwright.async_api import Page, async_playwright

from tests.dmp_bridge.filing_world import SAMPLES, sample
from tests.harness import GatewayProcess
from tests.webmail.browser import CHROMIUM, LAUNCH_ARGS, check_page, require_browser_tools
from tests.webmail.client import base_url, tls_context
from tests.webmail.test_record_pages import HOSTILE_CDA_MARK, SAMPLE_FILES, file_documents, hostile_cda

pytestmark = [pytest.mark.timeout(480),
              pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")]

QUERY = "urn:oid:1.2.250.1.213.1.4.10|{ins}"


def fhir(gateway: GatewayProcess, account: dict[str, Any]) -> httpx.Client:
    return httpx.Client(base_url=base_url(gateway) + "/fhir", verify=tls_context(gateway),
                        auth=(account["address"], account["password"]), timeout=30)


async def sign_in(page: Page, base: str, patient: dict[str, Any]) -> None:
    await page.goto(base + "/connexion")
    await page.get_by_label("Votre adresse de messagerie").fill(patient["address"])
    await page.get_by_label("Mot de passe").fill(patient["password"])
    await page.get_by_role("button", name="Continuer").click()
    await page.wait_for_url("**/connexion/activer")
    secret = (await page.locator("code.secret").inner_text()).strip()
    await page.get_by_label("Code à 6 chiffres").fill(pyotp.TOTP(secret).at(int(time.time())))
    await page.get_by_role("button", name="Activer").click()
    await page.get_by_role("link", name="J'ai conservé mes codes, aller à mes messages").click()
    await page.wait_for_url(base + "/")


async def wait_for_documents(page: Page, base: str, count: int) -> None:
    for _ in range(120):
        await page.goto(base + "/documents")
        if await page.locator(".document-list__item").count() >= count:
            return
        await page.wait_for_timeout(500)
    raise AssertionError("the filed documents never appeared")


async def history_sentences(page: Page, base: str) -> list[str]:
    await page.goto(base + "/historique")
    return [" ".join(text.split()) for text in await page.locator(".history__sentence").all_inner_texts()]


async def test_record_journey_in_chromium(gateway: GatewayProcess) -> None:
    axe_source = require_browser_tools()
    file_documents(gateway, *((name, sample(name)) for name in SAMPLE_FILES), ("hostile.xml", hostile_cda()))
    file_documents(gateway, ("BIO_V2.xml", sample("BIO-CR-BIO_2021.01_Microbiologie_V2.xml")))
    patient, doctor, pharmacist = gateway.account("PAT"), gateway.account("PER"), gateway.account("PER", 1)
    query = {"patient.identifier": QUERY.format(ins=patient["owner"])}
    base = base_url(gateway)
    origin = urlparse(base).netloc
    problems: list[str] = []
    foreign: list[str] = []
    confirmations: list[str] = []
    pages: dict[str, str] = {}

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900},
                                            locale="fr-FR", accept_downloads=True)
        page = await context.new_page()
        page.on("request", lambda r: None if urlparse(r.url).scheme not in ("http", "https")  # the PDF viewer's own
                or urlparse(r.url).netloc == origin else foreign.append(r.url))

        async def confirm(dialog: Any) -> None:  # the data-confirm questions: read, then accepted
            confirmations.append(dialog.message)
            await dialog.accept()
        page.on("dialog", confirm)

        async def visit(name: str) -> None:
            pages[name] = page.url
            await check_page(page, axe_source, f"record-{name}", 1280, problems)

        await sign_in(page, base, patient)
        await wait_for_documents(page, base, 5)
        await visit("documents")
        assert await page.get_by_text("Remplacé par une version plus récente").count() == 1

        # Filter by type.
        await page.get_by_label("Type de document").select_option(label="CR d'examens biologiques")
        await page.get_by_role("button", name="Afficher").click()
        assert await page.locator(".document-list__item").count() == 2
        await visit("documents-filtres")

        # A level-1 CDA: its PDF in a sandboxed frame, served with CSP sandbox.
        await page.goto(base + "/documents")
        await page.locator(".document-list__title", has_text="CR d’imagerie médicale").click()
        frame = page.locator("iframe.pdf-frame")
        pdf_url = base + (await frame.get_attribute("src") or "")
        pdf = await page.request.get(pdf_url)
        assert pdf.headers["content-security-policy"].startswith("sandbox;") and (await pdf.body()).startswith(b"%PDF-")
        assert pdf.headers["x-content-type-options"] == "nosniff"
        await page.wait_for_timeout(1500)  # the PDF viewer draws the page (seen in the screenshot)
        await visit("document-pdf")

        # A level-3 CDA: its sections as tables.
        await page.goto(base + "/documents")
        await page.locator(".document-list__title").get_by_text("NOTE DE VACCINATION", exact=True).click()
        assert await page.get_by_role("heading", name="Note de vaccination", exact=True, level=2).count() == 1
        assert await page.locator(".narrative table").count() >= 1
        vaccination_url = page.url
        vaccination_id = vaccination_url.rsplit("/", 1)[1]
        await visit("document-cda")

        # A filed document carrying scripts: shown as text, nothing runs.
        await page.goto(base + "/documents")
        await page.locator(".document-list__title").get_by_text("Note piégée", exact=True).click()
        await page.wait_for_load_state("networkidle")
        assert await page.get_by_text(HOSTILE_CDA_MARK).count() == 1
        assert await page.title() != "pwned" and await page.evaluate("() => document.title") != "pwned"
        assert await page.locator(".document-body script, .document-body img, .document-body a").count() == 0
        assert not confirmations, "no dialog opened by the document"

        # The history grows after a professional reads through the FHIR API; an emergency access shows its reason.
        before = await history_sentences(page, base)
        with fhir(gateway, doctor) as client:
            assert client.get(f"/Binary/{vaccination_id}").status_code == 200
            emergency = client.get("/DocumentReference", params=query,
                                   headers={"X-Emergency-Access-Reason": "Patient%20inconscient"})
            assert emergency.status_code == 200
        with fhir(gateway, pharmacist) as client:
            client.get("/DocumentReference", params=query)  # allowed or not by the matrix: audited either way
        after = await history_sentences(page, base)
        assert len(after) >= len(before) + 3
        assert any(s.startswith("Dr Claire MEDECIN, médecin, a consulté votre document « NOTE DE VACCINATION » le ")
                   for s in after), after
        assert any("en urgence" in s and "Patient inconscient" in s for s in after), after
        await visit("historique")

        # Hide a document: the professional's read is refused (the document no longer exists for them).
        await page.goto(vaccination_url)
        await page.get_by_role("button", name="Masquer aux professionnels").click()
        await page.wait_for_url("**?fait=masque")
        assert await page.get_by_role("status").inner_text() == "Ce document est désormais masqué aux professionnels."
        await visit("document-masque")
        with fhir(gateway, doctor) as client:
            assert client.get(f"/Binary/{vaccination_id}").status_code == 404

        # Block a professional: every read of the record refused.
        await page.goto(base + "/reglages")
        await visit("reglages")
        await page.get_by_label("Professionnel à bloquer").select_option(label="Marc PHARMACIEN, pharmacien")
        await page.get_by_role("button", name="Bloquer", exact=True).click()
        await page.wait_for_url("**fait=bloque**")
        assert await page.get_by_role("button", name="Débloquer Marc PHARMACIEN").count() == 1
        with fhir(gateway, pharmacist) as client:
            assert client.get("/DocumentReference", params=query).status_code == 403

        # Refuse emergency access: the doctor's emergency read is now refused, and the history says so.
        await page.get_by_role("button", name="Refuser l'accès en urgence").click()
        await page.wait_for_url("**fait=urgence-refusee**")
        assert "L'accès en urgence est refusé." in await page.locator("#urgence ~ p.info").first.inner_text()
        await visit("reglages-urgence-refusee")
        with fhir(gateway, doctor) as client:
            refused = client.get("/DocumentReference", params=query,
                                 headers={"X-Emergency-Access-Reason": "Patient%20inconscient"})
            assert refused.status_code == 403 and "emergency-access-opposed" in refused.text
        assert any("accès refusé : vous avez refusé l'accès en urgence" in s for s in await history_sentences(page, base))

        # Export everything.
        await page.goto(base + "/reglages")
        async with page.expect_download() as download_info:
            await page.get_by_role("button", name="Tout télécharger").click()
        download = await download_info.value
        archive = zipfile.ZipFile(await download.path())
        names = archive.namelist()
        assert any(n.startswith("messages/INBOX/") for n in names) and "historique.txt" in names
        assert len([n for n in names if n.startswith("documents/") and n.endswith((".xml", ".pdf"))]) == 5
        assert "a consulté votre document « NOTE DE VACCINATION »" in archive.read("historique.txt").decode()

        # The same pages at 360 px.
        await page.set_viewport_size({"width": 360, "height": 780})
        for name, url in pages.items():
            await page.goto(url)
            await check_page(page, axe_source, f"record-{name}", 360, problems)

        # Close the space: the consequences first, then a confirmation; signed out, and no way back in.
        await page.goto(base + "/reglages/fermer")
        await check_page(page, axe_source, "record-fermer", 360, problems)
        await page.set_viewport_size({"width": 1280, "height": 900})
        await check_page(page, axe_source, "record-fermer", 1280, problems)
        assert await page.get_by_text("détruits définitivement, sauvegardes comprises").count() == 1
        await page.get_by_label("Je comprends que mes messages et mes documents seront détruits").check()
        await page.get_by_role("button", name="Fermer mon espace").click()
        assert await page.get_by_role("heading", level=1).inner_text() == "Votre espace est fermé"
        await check_page(page, axe_source, "record-ferme", 1280, problems)
        await page.goto(base + "/documents")
        assert page.url.endswith("/connexion")
        await page.get_by_label("Votre adresse de messagerie").fill(patient["address"])
        await page.get_by_label("Mot de passe").fill(patient["password"])
        await page.get_by_role("button", name="Continuer").click()
        assert await page.get_by_role("alert").count() == 1 and page.url.endswith("/connexion")
        await context.close()
        await browser.close()

    assert any("Masquer ce document" in c for c in confirmations) and any("Bloquer" in c for c in confirmations)
    assert not foreign, foreign
    assert not problems, "\n".join(problems)
