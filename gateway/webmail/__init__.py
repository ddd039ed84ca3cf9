"""The patient webmail: server-rendered pages on the HTTPS listener, beside the FHIR API.

``build_webmail_app(services, settings)`` (app.py) returns the aiohttp
application ``gateway serve`` passes as the listener's root; the FHIR API is a
sub-application under ``fhir.base_path`` and keeps its own rules.

Adding a page:

1. a routes module in this package with ``def install(app: web.Application) -> None``
   adding its handlers (``app.router.add_get("/documents", documents_page)``) and, for a
   page of the navigation bar, ``add_nav(app, "/documents", N_("Documents"))`` (web.py);
   every handler that shows patient data starts with
   ``patient = await require_patient(request)`` (auth.py): the signed-in
   patient's mailbox id, address and INS, or a redirect to the sign-in page;
2. list the module in ``PAGES`` in app.py;
3. a template in ``templates/`` extending ``base.html``; render it with
   ``render(request, "documents.html", {...})`` (web.py), which adds the CSRF
   token (put ``{{ csrf_field() }}`` in every form: POSTs without it are
   refused by the middleware) and the security headers;
4. every visible string through the catalogue: ``{{ _("Documents") }}`` in
   templates, ``translate(request, "...")`` in Python; then
   ``python -m gateway.webmail.catalogue update`` refreshes
   ``locale/messages.pot`` and ``locale/fr/LC_MESSAGES/messages.po``: write
   the French translations there (compiled in memory at start: no .mo to build;
   tests/webmail/test_catalogue.py fails on a missing or untranslated string).
"""
