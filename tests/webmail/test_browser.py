"""The patient's journey in a real browser (Playwright + Debian chromium) against a running ``gateway serve``:
enrol TOTP and sign in, read a message a professional sent over SMTP, reply, see that a new conversation is not
offered and is refused when forced; a script in a received HTML message does not run; axe-core finds no
serious or critical violation on any page; screenshots at 360 px and 1280 px."""

from __future__ import annotations

import time
import uuid
from typing import Any
from urllib.parse import urlparse

import pyotp
import pytest
from playwright.async_api import async_playwright

from tests.harness import GatewayProcess
from tests.webmail.browser import CHROMIUM, LAUNCH_ARGS, check_page, require_browser_tools
from tests.webmail.client import KNOWN, base_url, professional_message, send_as_professional

pytestmark = pytest.mark.timeout(420)

HOSTILE_HTML = (
    "<p>Bonjour, vos <strong>résultats</strong> sont normaux.</p>"
    "<script>window.__pwned = 'script';</script>"
    "<img src=x onerror=\"window.__pwned = 'onerror'\">"
    "<img src=\"https://tracker.example/pixel.gif\" alt=\"\">"
    "<a href=\"javascript:window.__pwned='link'\">voir</a>"
    "<iframe src=\"https://evil.example/\"></iframe>"
    "<svg><script>window.__pwned='svg'</script></svg>"
)


async def test_patient_journey_in_chromium(shared_gateway: GatewayProcess) -> None:
    axe_source = require_browser_tools()
    doctor, nurse, patient = shared_gateway.account("PER"), shared_gateway.account("PER", 2), shared_gateway.account("PAT")
    title = f"Résultats {uuid.uuid4().hex[:6]}"
    send_as_professional(shared_gateway, doctor, patient["address"], professional_message(
        doctor, patient["address"], title, text="Bonjour, vos résultats sont normaux.\r\n", html=HOSTILE_HTML,
        attachment=("compte-rendu.pdf", b"%PDF-1.4\n")))
    base = base_url(shared_gateway)
    origin = urlparse(base).netloc
    problems: list[str] = []
    foreign_requests: list[str] = []
    dialogs: list[str] = []
    pages: dict[str, str] = {}

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900},
                                            locale="fr-FR")
        page = await context.new_page()
        page.on("request", lambda request: None if urlparse(request.url).netloc in (origin, "")
                or request.url.startswith("data:") else foreign_requests.append(request.url))
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))

        async def visit(name: str) -> None:
            pages[name] = page.url
            await check_page(page, axe_source, name, 1280, problems)

        # Sign in: password, then enrol TOTP by QR code.
        await page.goto(base + "/connexion")
        await visit("connexion")
        await page.get_by_label("Votre adresse de messagerie").fill(patient["address"])
        await page.get_by_label("Mot de passe").fill("pas le bon mot de passe")
        await page.get_by_role("button", name="Continuer").click()
        assert await page.get_by_role("alert").inner_text() == "L'adresse ou le mot de passe est incorrect."
        await visit("connexion-erreur")
        await page.get_by_label("Mot de passe").fill(patient["password"])
        await page.get_by_role("button", name="Continuer").click()
        await page.wait_for_url("**/connexion/activer")
        assert await page.locator("figure.qr svg").count() == 1
        await visit("activer")
        secret = (await page.locator("code.secret").inner_text()).strip()
        step = int(time.time()) // 30
        await page.get_by_label("Code à 6 chiffres").fill(pyotp.TOTP(secret).at(step * 30))
        await page.get_by_role("button", name="Activer").click()
        codes = [c.strip() for c in await page.locator(".recovery-codes code").all_inner_texts()]
        assert len(codes) == 10
        KNOWN[(str(shared_gateway.data_dir), patient["address"])] = {"secret": secret, "codes": codes, "step": step}
        await visit("codes-secours")
        await page.get_by_role("link", name="J'ai conservé mes codes, aller à mes messages").click()
        await page.wait_for_url(base + "/")

        # The inbox: the professional's message, and no way to start a conversation.
        for _ in range(60):
            if await page.get_by_role("link", name=title).count():
                break
            await page.wait_for_timeout(500)
            await page.reload()
        await visit("messages")
        assert await page.locator("form:not([action='/deconnexion'])").count() == 0
        assert await page.get_by_text("seul un professionnel peut commencer un échange").count() == 1

        # Read it: sanitised, nothing runs, nothing fetched from elsewhere.
        await page.get_by_role("link", name=title).click()
        await page.wait_for_load_state("networkidle")
        await visit("message")
        assert await page.locator("article strong").inner_text() == "résultats"
        assert await page.evaluate("() => window.__pwned") is None
        assert await page.locator("article script, article iframe, article svg").count() == 0
        assert await page.locator("article [href^='javascript'], article [onerror], article [src*='tracker']").count() == 0
        assert "Les images provenant d'autres sites n'ont pas été chargées" in await page.locator("p.info").inner_text()

        # Reply.
        await page.goto(pages["message"])
        await page.get_by_label(f"Votre réponse à {doctor['display_name']}").fill("Merci docteur, bien reçu.")
        await page.get_by_role("button", name="Envoyer ma réponse").click()
        await page.wait_for_url("**/conversations/**")
        assert await page.get_by_role("status").inner_text() == "Votre réponse a été envoyée."
        await visit("echange")

        # A new conversation, forced with the page's own CSRF token: refused by the pipeline.
        token = await page.locator("input[name=csrf]").first.get_attribute("value")
        forced = await page.request.post(f"{base}/conversations/{nurse['address']}/repondre",
                                         form={"csrf": token or "", "text": "Bonjour, un rendez-vous ?"})
        assert forced.status == 403 and "Vous ne pouvez pas commencer un échange" in await forced.text()
        await page.goto(f"{base}/conversations/{nurse['address']}")
        assert page.url.endswith(nurse["address"]) and await page.get_by_role("heading", level=1).inner_text() \
            == "Page introuvable"
        await visit("introuvable")

        # The account's security page: recovery codes left, sign out everywhere offered.
        await page.get_by_role("link", name="Sécurité du compte").click()
        assert await page.get_by_text("Codes de secours encore inutilisés : 10").count() == 1
        assert await page.get_by_role("button", name="Me déconnecter partout").count() == 1
        await visit("securite")

        # The same pages at 360 px: usable on a phone, still no serious or critical violation.
        await page.set_viewport_size({"width": 360, "height": 780})
        for name, url in pages.items():
            if name.startswith("connexion") or name in ("activer", "codes-secours"):
                continue
            await page.goto(url)
            await check_page(page, axe_source, name, 360, problems)
        await page.get_by_role("button", name="Se déconnecter").click()
        await page.wait_for_url("**/connexion?sortie=1")
        await check_page(page, axe_source, "deconnecte", 360, problems)
        await context.close()
        await browser.close()

    assert not dialogs, dialogs
    assert not foreign_requests, foreign_requests
    assert not problems, "\n".join(problems)
