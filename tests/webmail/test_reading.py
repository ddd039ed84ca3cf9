"""The reading page's message parser: sanitised HTML, blocked remote content, S/MIME status from our own field."""

from __future__ import annotations

from email.message import EmailMessage

from gateway.webmail.reading import attachment_part, read, safe_filename, sanitise_html


def test_scripts_handlers_and_remote_content_are_removed() -> None:
    html, blocked = sanitise_html(
        '<p onclick="x()">a</p><script>alert(1)</script><img src="https://t.example/p.gif"><img src=x onerror=y>'
        '<a href="javascript:alert(1)">j</a><a href="https://ok.example/">ok</a><style>p{}</style>'
        '<form action="https://evil.example"><input name=p></form><iframe src="https://e.example"></iframe>'
        '<div style="background:url(https://t.example/bg)">s</div><svg><script>1</script></svg>'
        '<img src="data:image/svg+xml;base64,PHN2Zz4=">')
    assert blocked
    for forbidden in ("script", "onclick", "onerror", "t.example", "javascript", "<style", "<form", "<input",
                      "<iframe", "style=", "<svg", "svg+xml", "<img"):
        assert forbidden not in html, forbidden
    assert '<a href="https://ok.example/" rel="noopener noreferrer nofollow">ok</a>' in html


def test_inline_data_images_are_kept_with_a_text_alternative() -> None:
    html, blocked = sanitise_html('<img src="data:image/png;base64,iVBORw0KGgo=">')
    assert not blocked and html == '<img alt="" src="data:image/png;base64,iVBORw0KGgo=">'


def _message(**headers: str) -> bytes:
    message = EmailMessage()
    message["From"] = "Dr Claire MEDECIN <claire.medecin@demo.mssante.localhost>"
    message["To"] = "279035121518989@patient.mssante.localhost"
    message["Subject"] = "Compte rendu"
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Texte <b>pas du HTML</b>")
    message.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="../../etc/passwd\".pdf")
    return message.as_bytes()


def test_smime_status_only_from_the_gateways_own_field() -> None:
    ours = read(_message(Authentication_Results="mx.gateway.test; smime=pass header.from=claire"),
                authserv_id="mx.gateway.test")
    forged = read(_message(Authentication_Results="evil.example; smime=pass"), authserv_id="mx.gateway.test")
    assert ours.smime == "pass" and forged.smime == "none"


def test_text_stays_text_and_attachments_are_named_safely() -> None:
    message = read(_message(X_MSS_MES="FIN"), authserv_id="gw")
    assert message.text is not None and "<b>pas du HTML</b>" in message.text and message.html is None
    assert message.ends_conversation
    [attachment] = message.attachments
    assert attachment.filename == "passwd.pdf" and "/" not in attachment.filename
    assert attachment_part(_message(), attachment.index) is not None
    assert attachment_part(_message(), 0) is None          # the text body is not downloadable as an attachment
    assert safe_filename("\x00\x1b", 3) == "piece-jointe-3"
