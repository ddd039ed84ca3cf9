"""Turn a stored message into what the reading page shows, safely.

- HTML parts go through nh3 (an allow-list of tags and attributes, no script,
  no style, no event handler, no form); every image whose source is not an
  inline ``data:image/`` URL is dropped, so nothing is fetched from elsewhere
  (remote content would tell the sender when and where the patient read).
  The page's CSP (``img-src 'self' data:``) is the second layer.
- Text parts are escaped by the template (autoescape), never marked safe.
- Attachments are listed by their position among the leaf parts and served
  only as downloads (messages.py).
- The S/MIME status comes from the ``Authentication-Results`` field the
  gateway itself wrote (RFC 8601 with the RFC 7281 ``smime`` method): forged
  fields claiming our authserv-id are removed at delivery (pipeline/trace.py).
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
import datetime as dt

import nh3
from markupsafe import Markup

HTML_TAGS = frozenset({
    "a", "abbr", "b", "blockquote", "br", "caption", "cite", "code", "col", "colgroup", "dd", "del", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "li", "ol", "p", "pre", "q", "s", "small",
    "span", "strong", "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul",
})
HTML_ATTRIBUTES = {
    "a": {"href", "title"}, "img": {"src", "alt", "width", "height"}, "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan", "scope"}, "abbr": {"title"},
}
URL_SCHEMES = frozenset({"http", "https", "mailto", "data"})
IMG_WITHOUT_SRC = re.compile(r"<img(?![^>]*\ssrc=)[^>]*>", re.IGNORECASE)
IMG_WITHOUT_ALT = re.compile(r"<img(?![^>]*\salt=)", re.IGNORECASE)
SMIME_RESULT = re.compile(r"\bsmime=([a-z]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    index: int              # position among the leaf parts (stable for a stored message)
    filename: str
    content_type: str
    size: int


@dataclass
class ReadMessage:
    subject: str
    from_name: str
    from_address: str
    to: list[str]
    date: dt.datetime | None
    text: str | None = None
    html: Markup | None = None
    remote_content_blocked: bool = False
    attachments: list[Attachment] = field(default_factory=list)
    smime: str = "none"                 # RFC 7281 result, "none" when the gateway wrote none
    ends_conversation: bool = False     # X-MSS-MES: FIN or subject [FIN] (mssante.md 2.1)
    message_id: str | None = None
    references: str | None = None
    encrypted: bool = False             # still enveloped (not for a key the gateway holds)


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def leaf_parts(message: Message) -> list[Message]:
    return [part for part in message.walk() if not part.is_multipart()]


def is_attachment(part: Message) -> bool:
    disposition = (part.get_content_disposition() or "").lower()
    return disposition == "attachment" or bool(part.get_filename()) or part.get_content_maintype() not in ("text",)


def read(raw: bytes, *, authserv_id: str) -> ReadMessage:
    message = parse(raw)
    from_name, from_address = parseaddr(str(message.get("From", "")))
    try:
        date = parsedate_to_datetime(str(message["Date"])) if message.get("Date") else None
    except (TypeError, ValueError):
        date = None
    subject = str(message.get("Subject", "") or "")
    result = ReadMessage(
        subject=subject, from_name=from_name, from_address=from_address.lower(),
        to=[address for _, address in getaddresses([str(v) for v in message.get_all("To", [])])], date=date,
        smime=smime_status(message, authserv_id),
        ends_conversation=str(message.get("X-MSS-MES", "")).strip().upper() == "FIN" or subject.strip() == "[FIN]",
        message_id=str(message["Message-ID"]).strip() if message.get("Message-ID") else None,
        references=str(message["References"]).strip() if message.get("References") else None,
        encrypted=message.get_content_type() in ("application/pkcs7-mime", "application/x-pkcs7-mime"),
    )
    body: Message | None = None
    for index, part in enumerate(leaf_parts(message)):
        if is_attachment(part):
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            result.attachments.append(Attachment(index, safe_filename(part.get_filename(), index),
                                                 part.get_content_type(), size))
        elif body is None or (part.get_content_subtype() == "html" and body.get_content_subtype() != "html"):
            body = part
    if body is not None:
        content = text_of(body)
        if body.get_content_subtype() == "html":
            result.html, result.remote_content_blocked = sanitise_html(content)
        else:
            result.text = content
    return result


def text_of(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:                         # an unknown charset name
        return payload.decode("utf-8", errors="replace")


def sanitise_html(html: str) -> tuple[Markup, bool]:
    """The HTML reduced to harmless markup, and whether remote images were removed."""
    blocked = False

    def keep(tag: str, attribute: str, value: str) -> str | None:
        nonlocal blocked
        if tag == "img" and attribute == "src":
            if value.strip().lower().startswith("data:image/") and not value.strip().lower().startswith("data:image/svg"):
                return value
            blocked = True
            return None
        if attribute == "href" and value.strip().lower().startswith("data:"):
            return None
        return value

    cleaned = nh3.clean(html, tags=set(HTML_TAGS), attributes={k: set(v) for k, v in HTML_ATTRIBUTES.items()},
                        attribute_filter=keep, url_schemes=set(URL_SCHEMES), strip_comments=True,
                        link_rel="noopener noreferrer nofollow")
    # An image whose source was removed is dropped whole; one kept without text gets alt="" (decorative),
    # so screen readers skip it (WCAG 1.1.1). nh3's output is normalised, with quoted attributes.
    cleaned = IMG_WITHOUT_SRC.sub("", cleaned)
    cleaned = IMG_WITHOUT_ALT.sub("<img alt=\"\"", cleaned)
    return Markup(cleaned), blocked   # noqa: S704 - nh3 output: the allow-list above is the whole vocabulary


def smime_status(message: Message, authserv_id: str) -> str:
    """The ``smime=`` result in the Authentication-Results field(s) the gateway wrote (RFC 8601 2.2)."""
    for value in message.get_all("Authentication-Results", []):
        text = str(value)
        serv, _, results = text.partition(";")
        if serv.strip().lower() != authserv_id.lower():
            continue
        match = SMIME_RESULT.search(results)
        if match:
            return match.group(1).lower()
    return "none"


def safe_filename(name: str | None, index: int) -> str:
    """A file name for Content-Disposition: no path, no control characters, bounded."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable() and ch not in '"<>:|?*').strip(" .")
    return base[:120] or f"piece-jointe-{index}"


def attachment_part(raw: bytes, index: int) -> Message | None:
    """The attachment at ``index`` (only parts listed as attachments may be downloaded)."""
    parts = leaf_parts(parse(raw))
    if 0 <= index < len(parts) and is_attachment(parts[index]):
        return parts[index]
    return None
