"""Assemble the webmail application: context, middlewares, static files and every page module."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

from gateway.config import Settings
from gateway.webmail import account, controls, documents, export, history, messages, oidc_signin, second_factor, signin
from gateway.webmail.boundary import door_boundary
from gateway.webmail.keys import WebmailKey, webmail_key_path
from gateway.webmail.sessions import SessionStore
from gateway.webmail.throttle import limiter_for
from gateway.webmail.web import (CONTEXT, WebmailContext, csrf_protection, error_pages, security_headers,
                                 template_environment)

STATIC = Path(__file__).resolve().parent / "static"
MAX_FORM_BYTES = 2 * 1024 * 1024   # a reply with its text; attachments are not uploaded from the webmail

# Page modules, each with install(app). Their order is the order of the navigation.
PAGES: list[ModuleType] = [signin, second_factor, oidc_signin, messages, documents, history, controls, account, export]


def build_webmail_app(services: Any, settings: Settings, *, pipeline: Any = None) -> web.Application:
    """The webmail as the HTTPS listener's root application (the FHIR API is mounted under it by the listener)."""
    app = web.Application(middlewares=[security_headers, error_pages, door_boundary, csrf_protection],
                          client_max_size=MAX_FORM_BYTES)
    ctx = WebmailContext(
        services=services, settings=settings, sessions=SessionStore(services.db, settings.webmail),
        key=WebmailKey.load_or_create(webmail_key_path(settings.data_path)), limiter=limiter_for(services, settings),
        templates=template_environment())
    ctx.extras["pipeline"] = pipeline
    app[CONTEXT] = ctx
    app.router.add_static("/static", STATIC, append_version=False)
    for page in PAGES:
        page.install(app)
    return app
