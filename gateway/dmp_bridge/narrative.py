"""A filed document's human-readable part, made safe to show in a browser.

- A PDF (filed as such, or the level-1 CDA's ``nonXMLBody``, IHE XDS-SD) is
  returned as bytes, for the webmail to serve sandboxed (CSP ``sandbox``,
  ``nosniff``) or to download; it is never inlined into a page.
- A level-1 CDA carrying plain text gives that text (escaped by the template).
- A level-3 CDA gives its narrative: every ``section`` (nested ones too) with
  its ``title`` and its ``text``, the CDA R2 NarrativeBlock (HL7 CDA R2
  §4.3.5) mapped element by element onto a small HTML subset: paragraph -> p,
  list/item -> ul|ol/li, table and its parts, content with styleCode Bold /
  Italics / Underline -> strong / em / u, sub, sup, br, caption, footnote.
  Everything else keeps its text and loses its markup: no attribute is copied
  but colspan / rowspan, no link is followed (linkHtml shows its text), no
  image is fetched (renderMultiMedia says it is not shown). The HTML is built
  with every text escaped, then passed through nh3 (ammonia) with the same
  allow-list, so that even a mistake here cannot let a script or a handler through.

The XML is read with the hardened parser (``safe_xml``: no DTD, no entity, bounded).
"""

from __future__ import annotations

import enum
import html
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import nh3

from gateway.dmp_bridge.cda import BodyKind, cda_from_element, is_cda_root
from gateway.dmp_bridge.errors import DocumentError
from gateway.dmp_bridge.pdf import looks_like_pdf
from gateway.dmp_bridge.safe_xml import local_name, parse_xml

ALLOWED_TAGS = {"p", "br", "ul", "ol", "li", "table", "caption", "thead", "tbody", "tfoot", "tr", "th", "td",
                "strong", "em", "u", "sub", "sup", "span", "small"}
ALLOWED_ATTRIBUTES = {"td": {"colspan", "rowspan"}, "th": {"colspan", "rowspan"}}
BLOCK_MAP = {"paragraph": "p", "item": "li", "table": "table", "caption": "caption", "thead": "thead",
             "tbody": "tbody", "tfoot": "tfoot", "tr": "tr", "th": "th", "td": "td", "sub": "sub", "sup": "sup",
             "footnote": "small"}
STYLE_MAP = {"bold": "strong", "italics": "em", "underline": "u"}
MAX_DEPTH = 6
MAX_SPAN = 1000


class ReadableKind(str, enum.Enum):
    PDF = "pdf"
    TEXT = "text"
    SECTIONS = "sections"
    NONE = "none"  # nothing a browser may show (an image, another format): download only


@dataclass(frozen=True)
class Section:
    title: str | None
    html: str    # sanitised narrative (safe to mark as such in a template)
    depth: int   # 1 for a top-level section


@dataclass(frozen=True)
class Readable:
    kind: ReadableKind
    title: str | None = None
    pdf: bytes | None = None
    text: str | None = None
    sections: list[Section] = field(default_factory=list)
    media_type: str | None = None


def human_readable(content: bytes) -> Readable:
    """What of ``content`` (a filed document's bytes) a patient can read, and how."""
    if looks_like_pdf(content):
        return Readable(ReadableKind.PDF, pdf=content, media_type="application/pdf")
    try:
        root = parse_xml(content)
    except DocumentError:
        return Readable(ReadableKind.NONE)
    if not is_cda_root(root):
        return Readable(ReadableKind.NONE)
    title = _title(root)
    body = _child(root, "component")
    structured = _child(body, "structuredBody") if body is not None else None
    if structured is not None:
        return Readable(ReadableKind.SECTIONS, title=title, sections=list(_sections(structured, 1)))
    return _level_one(root, title)


def _level_one(root: ET.Element, title: str | None) -> Readable:
    try:
        body = cda_from_element(root).body
    except DocumentError:
        return Readable(ReadableKind.NONE, title=title)
    if body is None or body.kind != BodyKind.UNSTRUCTURED or body.content is None:
        return Readable(ReadableKind.NONE, title=title)
    media = (body.media_type or "").lower()
    if looks_like_pdf(body.content):
        return Readable(ReadableKind.PDF, title=title, pdf=body.content, media_type="application/pdf")
    if media.startswith("text/plain"):
        return Readable(ReadableKind.TEXT, title=title, text=body.content.decode("utf-8", errors="replace"),
                        media_type="text/plain")
    return Readable(ReadableKind.NONE, title=title, media_type=media or None)


def _child(element: ET.Element | None, name: str) -> ET.Element | None:
    if element is None:
        return None
    return next((child for child in element if local_name(child.tag) == name), None)


def _title(root: ET.Element) -> str | None:
    title = _child(root, "title")
    text = "".join(title.itertext()).strip() if title is not None else ""
    return text or None


def _sections(container: ET.Element, depth: int) -> list[Section]:
    """Sections in document order, nested ones after their parent (depth capped for headings)."""
    found: list[Section] = []
    for component in (child for child in container if local_name(child.tag) == "component"):
        section = _child(component, "section")
        if section is None:
            continue
        text = _child(section, "text")
        found.append(Section(_title(section), sanitise(narrative_html(text)) if text is not None else "",
                             min(depth, MAX_DEPTH)))
        found.extend(_sections(section, depth + 1))
    return found


def narrative_html(text: ET.Element) -> str:
    """The NarrativeBlock ``text`` as HTML of the allowed subset (every text escaped)."""
    return "".join(_inner(text))


def _inner(element: ET.Element) -> list[str]:
    parts = [html.escape(element.text)] if element.text else []
    for child in element:
        parts.append(_element(child))
        if child.tail:
            parts.append(html.escape(child.tail))
    return parts


def _element(element: ET.Element) -> str:
    name = local_name(element.tag) if isinstance(element.tag, str) else ""
    if not name:  # comments and processing instructions
        return ""
    if name == "br":
        return "<br>"
    if name == "list":
        tag = "ol" if (element.get("listType") or "").lower() == "ordered" else "ul"
        return f"<{tag}>{''.join(_inner(element))}</{tag}>"
    if name == "renderMultiMedia":
        return "<em>[image non affichée]</em>"
    if name in ("col", "colgroup", "footnoteRef"):
        return ""
    if name == "content":
        return _styled(element, "".join(_inner(element)))
    if name in BLOCK_MAP:
        tag = BLOCK_MAP[name]
        return f"<{tag}{_spans(element) if tag in ('td', 'th') else ''}>{''.join(_inner(element))}</{tag}>"
    return "".join(_inner(element))  # linkHtml and anything unknown: its text, no markup


def _styled(element: ET.Element, inner: str) -> str:
    for style in (element.get("styleCode") or "").lower().split():
        tag = STYLE_MAP.get(style)
        if tag:
            inner = f"<{tag}>{inner}</{tag}>"
    return inner


def _spans(element: ET.Element) -> str:
    attributes = ""
    for name in ("colspan", "rowspan"):
        value = element.get(name)
        if value and value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_SPAN:
            attributes += f' {name}="{int(value)}"'
    return attributes


def sanitise(fragment: str) -> str:
    """nh3 over the fragment: only the allowed tags and attributes, no URL of any scheme."""
    return nh3.clean(fragment, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=set(),
                     link_rel=None, strip_comments=True)
