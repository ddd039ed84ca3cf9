"""What every webmail page shares: the context on the app, rendering, cookies, CSRF and the middlewares.

Security headers (every webmail response): CSP ``default-src 'self'`` with no
inline script and ``frame-ancestors 'none'``, nosniff, ``Referrer-Policy:
no-referrer``, HSTS (RFC 6797), ``Cache-Control: no-store`` (health data is
not cached by the browser or a proxy). HSTS and nosniff also go on the FHIR
API's responses, which share the listener.

CSRF: every POST carries a ``csrf`` field equal to HMAC(webmail key, the
session cookie), or of a pre-session cookie before sign-in (login CSRF);
anything else gets 403. SameSite=Strict cookies are the second layer.

Refusals: a handler that refuses for access control marks the request with
``refused`` (the reason, a stable word) before answering; the door's boundary
(``boundary.door_boundary``) writes the marked ones to the audit log as
``door_refused`` and any exception that becomes a 500 as ``command_failed``.
"""

from __future__ import annotations

import hmac
from email.utils import parseaddr
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from aiohttp import web
from markupsafe import Markup

from gateway.config import Settings
from gateway.ops.proxied import peer_host
from gateway.webmail.catalogue import DEFAULT_LOCALE, translations
from gateway.webmail.keys import WebmailKey
from gateway.webmail.sessions import ActiveSession, SessionStore

if TYPE_CHECKING:
    from gateway.webmail.auth import PatientIdentity

log = logging.getLogger("gateway.webmail")

TEMPLATES = Path(__file__).resolve().parent / "templates"
SESSION_COOKIE = "__Host-mss-session"   # RFC 6265bis 4.1.3.2: __Host- requires Secure, Path=/, no Domain
PRE_COOKIE = "__Host-mss-pre"           # anonymous visitor: binds the sign-in form's CSRF token
CSRF_FIELD = "csrf"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-src 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    "Cache-Control": "no-store",
}
HSTS = "max-age=31536000; includeSubDomains"  # RFC 6797 6.1.1


@dataclass
class NavItem:
    path: str
    label: str  # a catalogue msgid


@dataclass
class WebmailContext:
    """Everything a handler needs, stored once on the application (``request.app[CONTEXT]``)."""

    services: Any                 # gateway.app.Services (Any: the app module imports this package)
    settings: Settings
    sessions: SessionStore
    key: WebmailKey
    limiter: Any                  # the shared authentication limiter (see throttle.py)
    templates: jinja2.Environment
    nav: list[NavItem] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # services a page module builds once (by module name)


CONTEXT: web.AppKey[WebmailContext] = web.AppKey("webmail", WebmailContext)


def add_nav(app: web.Application, path: str, label: str) -> None:
    """Put a page in the navigation bar (``label`` is a catalogue msgid), in the order pages are installed."""
    app[CONTEXT].nav.append(NavItem(path, label))


def context(request: web.Request) -> WebmailContext:
    return request.config_dict[CONTEXT]


def template_environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, extensions=["jinja2.ext.i18n"],
                             trim_blocks=True, lstrip_blocks=True)
    env.install_gettext_translations(translations(DEFAULT_LOCALE), newstyle=True)  # type: ignore[attr-defined]
    env.filters["person"] = person
    return env


def person(value: str | None) -> str:
    """A From/To value as a patient reads it: the display name when there is one, else the address."""
    name, address = parseaddr(value or "")
    return name or address or (value or "")


def N_(message: str) -> str:
    """Marks a string for the catalogue where it is defined; translated where it is shown."""
    return message


def translate(request: web.Request | None, message: str, **params: Any) -> str:
    """``message`` from the catalogue in the page's language, with %(name)s parameters filled in."""
    text = translations(DEFAULT_LOCALE).gettext(message)
    return text % params if params else text


# ------------------------------------------------------------------ refusals the audit log keeps

REFUSAL_KEY: web.RequestKey[tuple[str, str | None]] = web.RequestKey("door_refusal", tuple)

# What one request learns once and several of its steps read (aiohttp's typed request storage).
SESSION_KEY: web.RequestKey[ActiveSession | None] = web.RequestKey("session")     # the cookie's live session
PATIENT_KEY: web.RequestKey[PatientIdentity] = web.RequestKey("patient")         # the signed-in patient
NEW_PRE_COOKIE_KEY: web.RequestKey[str] = web.RequestKey("new_pre_cookie", str)  # set on this response


def refused(request: web.Request, reason: str, reply: str | None = None) -> None:
    """Mark this request's answer as an access-control refusal (``reason``; ``reply`` when the answer carries
    one of its own, such as a mail policy's SMTP reply): the boundary audits it as ``door_refused``."""
    request[REFUSAL_KEY] = (reason, reply)


def refusal(request: web.Request, error: web.HTTPException, reason: str) -> web.HTTPException:
    """``error``, its request marked as refused for ``reason`` (``raise refusal(request, HTTPNotFound(), ...)``)."""
    refused(request, reason)
    return error


# ------------------------------------------------------------------ cookies and CSRF

def set_session_cookie(response: web.StreamResponse, token: str) -> None:
    # No Max-Age: the cookie ends with the browser; the server enforces idle and absolute timeouts.
    response.set_cookie(SESSION_COOKIE, token, path="/", secure=True, httponly=True, samesite="Strict")
    response.del_cookie(PRE_COOKIE, path="/")


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/")


def _binding_cookie(request: web.Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE) or request.cookies.get(PRE_COOKIE)


def csrf_token(request: web.Request) -> str:
    """The token forms of this page must carry; creates the pre-session cookie for an anonymous visitor."""
    bound = _binding_cookie(request) or request.get(NEW_PRE_COOKIE_KEY)
    if bound is None:
        bound = secrets.token_urlsafe(32)
        request[NEW_PRE_COOKIE_KEY] = bound
    return context(request).key.mac("csrf", bound)


def csrf_valid(request: web.Request, supplied: str | None) -> bool:
    bound = _binding_cookie(request)
    if not bound or not supplied:
        return False
    return hmac.compare_digest(context(request).key.mac("csrf", bound), supplied)


def render(request: web.Request, template: str, values: dict[str, Any] | None = None, *,
           status: int = 200) -> web.Response:
    """The page ``template`` with ``values``, the navigation, and a CSRF field for its forms."""
    ctx = context(request)
    token = csrf_token(request)
    page = ctx.templates.get_template(template).render(
        request_path=request.path, nav=ctx.nav, patient=request.get(PATIENT_KEY),
        csrf_field=lambda: Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{token}">'),
        **(values or {}))
    response = web.Response(text=page, status=status, content_type="text/html", charset="utf-8")
    pre = request.get(NEW_PRE_COOKIE_KEY)
    if pre:
        response.set_cookie(PRE_COOKIE, pre, path="/", secure=True, httponly=True, samesite="Strict")
    return response


def client_ip(request: web.Request) -> str | None:
    """The client's address (behind a trusted proxy: the one its PROXY header named)."""
    return peer_host(request.transport)


# ------------------------------------------------------------------ middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_webmail_path(request: web.Request) -> bool:
    """True unless the path belongs to the FHIR API mounted beside the webmail."""
    prefix = context(request).settings.fhir.base_path
    return not (request.path == prefix or request.path.startswith(prefix + "/"))


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Strict-Transport-Security", HSTS)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if is_webmail_path(request):
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


@web.middleware
async def csrf_protection(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every state-changing webmail request carries the CSRF token of its session (form field or header)."""
    if request.method in UNSAFE_METHODS and is_webmail_path(request):
        supplied = request.headers.get("X-CSRF-Token")
        if supplied is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            value = (await request.post()).get(CSRF_FIELD)
            supplied = value if isinstance(value, str) else None
        if not csrf_valid(request, supplied):
            log.info("webmail: %s %s refused: missing or wrong CSRF token", request.method, request.path)
            raise refusal(request, web.HTTPForbidden(reason="CSRF token missing or invalid"), "csrf")
    return await handler(request)


ERROR_TITLES = {
    400: N_("The request could not be understood"),
    403: N_("This action is not allowed"),
    404: N_("Page not found"),
    405: N_("This action is not allowed"),
    409: N_("This action is not possible"),
    413: N_("The content sent is too large"),
    500: N_("An error occurred"),
}
ERROR_TEXTS = {
    403: N_("The page may have expired or the form was not sent from this site. Go back, reload the page and try again."),
    404: N_("This page does not exist, or it is not yours."),
    500: N_("The error has been recorded. Please try again in a few minutes."),
}


@web.middleware
async def error_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors of webmail paths become French pages with the same status; redirects pass through."""
    if not is_webmail_path(request):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_page(request, exc.status, exc.text if exc.status in (400, 409) and exc.text else None)
    except Exception:
        log.exception("webmail: %s %s failed", request.method, request.path)
        return _error_page(request, 500, None)


def _error_page(request: web.Request, status: int, detail: str | None) -> web.Response:
    title = translate(request, ERROR_TITLES.get(status, ERROR_TITLES[400]))
    text = detail or translate(request, ERROR_TEXTS.get(status, ERROR_TEXTS[403] if status == 405 else ERROR_TEXTS[404]))
    response = render(request, "error.html", {"title": title, "text": text, "status": status}, status=status)
    return response
