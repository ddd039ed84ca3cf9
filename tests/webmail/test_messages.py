"""Messages in the webmail, from both sides, against a running ``gateway serve``: a professional writes over
SMTP, the patient reads, replies, and cannot start a conversation or reply after FIN."""

from __future__ import annotations

import asyncio
import html as html_module
import imaplib
import re
import uuid
from typing import Any

import pytest

from tests.harness import GatewayProcess
from tests.webmail.client import (
    PatientBrowser,
    csrf_of,
    professional_message,
    send_as_professional,
    tls_context_for_ip,
    wait_for_subject,
)

pytestmark = pytest.mark.timeout(300)


def imap_flags(gateway: GatewayProcess, account: dict[str, Any], uid: int) -> str:
    with imaplib.IMAP4("127.0.0.1", gateway.ports["imap_port"]) as client:
        client.starttls(ssl_context=tls_context_for_ip(gateway))
        client.login(account["address"], account["password"])
        client.select("INBOX", readonly=True)
        status, data = client.uid("FETCH", str(uid), "(FLAGS)")
        assert status == "OK"
        return str(data[0])


def imap_subjects(gateway: GatewayProcess, account: dict[str, Any]) -> list[str]:
    with imaplib.IMAP4("127.0.0.1", gateway.ports["imap_port"]) as client:
        client.starttls(ssl_context=tls_context_for_ip(gateway))
        client.login(account["address"], account["password"])
        client.select("INBOX", readonly=True)
        status, data = client.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert status == "OK"
        return [part[1].decode(errors="replace") for part in data if isinstance(part, tuple)]


def subject(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


async def test_read_a_message_a_professional_sent_and_seen_over_imap(shared_gateway: GatewayProcess) -> None:
    doctor, patient = shared_gateway.account("PER"), shared_gateway.account("PAT")
    title = subject("Résultats de biologie")
    html = ('<p>Bonjour, voici vos <b>résultats</b>.</p><script>document.title="pwned"</script>'
            '<img src="https://tracker.example/pixel.gif" alt="pixel"><a href="javascript:alert(1)">lien</a>'
            '<p onclick="alert(2)" style="background:url(https://tracker.example/bg)">fin</p>')
    send_as_professional(shared_gateway, doctor, patient["address"], professional_message(
        doctor, patient["address"], title, text="Bonjour, voici vos résultats.\r\n", html=html,
        attachment=("compte-rendu.pdf", b"%PDF-1.4 fake but bytes\n")))
    async with PatientBrowser(shared_gateway, patient) as browser:
        await browser.sign_in()
        uid = await wait_for_subject(browser, title)
        assert "\\Seen" not in imap_flags(shared_gateway, patient, uid)
        page = await browser.get(f"/messages/{uid}")
        assert page.status_code == 200
        text = html_module.unescape(page.text)
        assert "<b>résultats</b>" in text
        assert "<script" not in text.split("<article", 1)[1] and "pwned" not in text
        assert "tracker.example" not in text and "javascript:" not in text and "onclick" not in text
        assert "Les images provenant d'autres sites n'ont pas été chargées" in text
        assert "Non signé" in text or "Signé par l'expéditeur" in text
        assert "\\Seen" in imap_flags(shared_gateway, patient, uid)        # same store, same flags as IMAP
        assert f"/messages/{uid}/pieces/" in text and "compte-rendu.pdf" in text
        link = text.split(f"/messages/{uid}/pieces/", 1)[1].split('"', 1)[0]
        download = await browser.get(f"/messages/{uid}/pieces/{link}")
        assert download.status_code == 200 and download.content == b"%PDF-1.4 fake but bytes\n"
        assert download.headers["content-disposition"] == "attachment; filename*=UTF-8''compte-rendu.pdf"
        assert download.headers["content-type"] == "application/octet-stream"
        assert download.headers["x-content-type-options"] == "nosniff"
        assert download.headers["content-security-policy"].startswith("sandbox")
        body_part = await browser.get(f"/messages/{uid}/pieces/0")     # the text body is not an attachment
        assert body_part.status_code == 404


async def test_reply_to_a_professional_who_wrote_first(shared_gateway: GatewayProcess) -> None:
    doctor, patient = shared_gateway.account("PER"), shared_gateway.account("PAT")
    title = subject("Rendez-vous")
    send_as_professional(shared_gateway, doctor, patient["address"],
                         professional_message(doctor, patient["address"], title, text="Pouvez-vous venir mardi ?\r\n"))
    async with PatientBrowser(shared_gateway, patient) as browser:
        await browser.sign_in()
        uid = await wait_for_subject(browser, title)
        page = await browser.get(f"/messages/{uid}")
        assert 'name="text"' in page.text
        answer = f"Oui, mardi me convient. {uuid.uuid4().hex[:6]}"
        reply = await browser.http.post(f"/conversations/{doctor['address']}/repondre", data={
            "csrf": csrf_of(page.text), "text": answer, "in_reply_to": str(uid)})
        assert reply.status_code == 303, reply.text[:2000]
        thread = await browser.get(reply.headers["location"])
        assert "Votre réponse a été envoyée." in thread.text
    for _ in range(100):
        if any(f"Re: {title}" in s for s in imap_subjects(shared_gateway, doctor)):
            break
        await asyncio.sleep(0.3)
    else:
        raise AssertionError("the doctor did not receive the reply")


async def test_new_conversation_not_offered_and_refused_when_forced(shared_gateway: GatewayProcess) -> None:
    patient, nurse = shared_gateway.account("PAT"), shared_gateway.account("PER", 2)
    async with PatientBrowser(shared_gateway, patient) as browser:
        await browser.sign_in()
        inbox = await browser.get("/")
        assert re.findall(r'<form[^>]*action="([^"]+)"', inbox.text) == ["/deconnexion"]   # no "write" form
        assert "repondre" not in inbox.text and "/nouveau" not in inbox.text
        assert "seul un professionnel peut commencer un échange" in inbox.text
        forced = await browser.http.post(f"/conversations/{nurse['address']}/repondre", data={
            "csrf": csrf_of(inbox.text), "text": "Bonjour, je voudrais un rendez-vous."})
        assert forced.status_code == 403
        assert "Vous ne pouvez pas commencer un échange" in forced.text and "550 5.7.1" in forced.text
        unknown_route = await browser.http.post("/messages/nouveau", data={"csrf": csrf_of(inbox.text)})
        assert unknown_route.status_code in (404, 405)
    assert not any("rendez-vous" in s.lower() for s in imap_subjects(shared_gateway, nurse))


async def test_no_reply_after_the_professional_ends_the_conversation(shared_gateway: GatewayProcess) -> None:
    pharmacist, patient = shared_gateway.account("PER", 1), shared_gateway.account("PAT")
    opening = subject("Ordonnance prête")
    send_as_professional(shared_gateway, pharmacist, patient["address"],
                         professional_message(pharmacist, patient["address"], opening))
    closing = subject("Fin des échanges")
    send_as_professional(shared_gateway, pharmacist, patient["address"], professional_message(
        pharmacist, patient["address"], closing, extra_headers={"X-MSS-MES": "FIN"}))
    async with PatientBrowser(shared_gateway, patient) as browser:
        await browser.sign_in()
        await wait_for_subject(browser, opening)
        uid = await wait_for_subject(browser, closing)
        page = await browser.get(f"/messages/{uid}")
        assert "a clos l'échange" in html_module.unescape(page.text) and 'name="text"' not in page.text
        forced = await browser.http.post(f"/conversations/{pharmacist['address']}/repondre", data={
            "csrf": csrf_of(page.text), "text": "Encore une question", "in_reply_to": str(uid)})
        assert forced.status_code == 403 and "a clos l'échange" in html_module.unescape(forced.text)


async def test_another_patients_message_cannot_be_read_by_changing_the_id(shared_gateway: GatewayProcess) -> None:
    doctor, first, second = shared_gateway.account("PER"), shared_gateway.account("PAT"), shared_gateway.account("PAT", 1)
    title = subject("Confidentiel")
    send_as_professional(shared_gateway, doctor, first["address"], professional_message(doctor, first["address"], title))
    async with PatientBrowser(shared_gateway, first) as owner:
        await owner.sign_in()
        uid = await wait_for_subject(owner, title)
    async with PatientBrowser(shared_gateway, second) as other:
        await other.sign_in()
        for path in (f"/messages/{uid}", f"/messages/{uid}/pieces/1", f"/conversations/{doctor['address']}"):
            page = await other.get(path)
            assert page.status_code == 404, path
            assert title not in page.text


async def test_session_cookie_replayed_after_sign_out_is_refused(shared_gateway: GatewayProcess) -> None:
    patient = shared_gateway.account("PAT", 1)
    async with PatientBrowser(shared_gateway, patient) as browser:
        await browser.sign_in()
        cookie = browser.http.cookies.get("__Host-mss-session")
        inbox = await browser.get("/")
        assert inbox.status_code == 200
        out = await browser.http.post("/deconnexion", data={"csrf": csrf_of(inbox.text)})
        assert out.status_code == 303
    async with PatientBrowser(shared_gateway, patient) as replay:
        replay.http.cookies.set("__Host-mss-session", cookie, domain="localhost")
        page = await replay.get("/")
        assert page.status_code == 303 and page.headers["location"] == "/connexion"


async def test_sign_out_everywhere_ends_every_session(shared_gateway: GatewayProcess) -> None:
    patient = shared_gateway.account("PAT", 1)
    async with PatientBrowser(shared_gateway, patient) as phone, PatientBrowser(shared_gateway, patient) as laptop:
        await phone.sign_in()
        await laptop.sign_in()
        page = await laptop.get("/")
        out = await laptop.http.post("/deconnexion/partout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303
        assert (await phone.get("/")).status_code == 303
        assert (await laptop.get("/")).status_code == 303
