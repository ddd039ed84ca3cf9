"""The HTTPS listener (``listen.http_port``) with the FHIR API mounted under ``fhir.base_path``.

``start_http_listener(services, settings)`` builds the record services, the
root aiohttp application with the FHIR sub-application, and serves it with
TLS 1.2+ (the gateway's certificate; client certificates asked for but
optional, verified against the trust anchors and the CRLs). Other
applications share the listener: the patient webmail passes itself as
``root`` (it then serves every path but the FHIR prefix), or is mounted under
a prefix with ``mounts={"/webmail": webmail_app}`` (aiohttp ``add_subapp``).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.audit.log import AuditLog
from gateway.config import Settings
from gateway.dmp_bridge.access import AccessMatrix, AccessPolicy
from gateway.dmp_bridge.fhir.auth import CallerResolver
from gateway.dmp_bridge.fhir.boundary import TrackedAuditLog
from gateway.dmp_bridge.fhir.routes import FhirConfig, FhirRoutes
from gateway.dmp_bridge.fhir.service import RecordAccessService
from gateway.dmp_bridge.patient_choices import LoggingNotifier, PatientChoicesService, PatientNotifier
from gateway.ops.proxied import ProxiedSite, proxy_guard
from gateway.security.auth_limiter import AuthLimiter, LimiterPolicy
from gateway.security.revocation import optional_client_certificate_context


@dataclass
class HttpListener:
    """The running HTTPS listener: where it listens, and how to stop it."""

    runner: web.AppRunner
    sites: list[ProxiedSite] = field(default_factory=list)

    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every bound socket (the real port when ``http_port`` is 0)."""
        return [(str(address[0]), int(address[1])) for address in self.runner.addresses]

    async def aclose(self) -> None:
        await self.runner.cleanup()


def build_fhir_app(access: RecordAccessService, resolver: CallerResolver, audit: AuditLog,
                   config: FhirConfig) -> web.Application:
    """The FHIR sub-application (routes relative to its mount point)."""
    app = web.Application(client_max_size=1024 * 1024)
    FhirRoutes(access, resolver, audit, config).install(app)
    return app


def record_access_from(services: Any, settings: Settings, *, audit: AuditLog | None = None,
                       notifier: PatientNotifier | None = None) -> tuple[RecordAccessService, AuditLog]:
    """The record access service built on ``services`` (db, blobs, and its audit log when it has one)."""
    shared_log = audit or getattr(services, "audit", None) or AuditLog.for_data_dir(services.db, settings.data_path)
    audit_log = TrackedAuditLog(shared_log)  # lets the FHIR boundary know which requests audited themselves
    policy = AccessPolicy(AccessMatrix.load(settings.fhir.access_matrix), emergency_enabled=settings.fhir.emergency_access,
                          emergency_professions=frozenset(settings.fhir.emergency_access_professions))
    choices = PatientChoicesService(services.db, audit_log)
    access = RecordAccessService(services.db, services.blobs, audit_log, choices, policy, notifier or LoggingNotifier(),
                                 fields=getattr(services, "fields", None))
    return access, audit_log


def fhir_config(settings: Settings) -> FhirConfig:
    fhir = settings.fhir
    return FhirConfig(fhir.base_path, fhir.page_size, fhir.max_page_size, fhir.emergency_access)


def https_context(services: Any, settings: Settings) -> ssl.SSLContext:
    """The gateway's certificate; client certificates optional, verified against the anchors and CRLs."""
    return optional_client_certificate_context(services, settings.hostname, settings.pki.server_names,
                                               settings.pki.server_ips)


async def start_http_listener(services: Any, settings: Settings, *, audit: AuditLog | None = None,
                              notifier: PatientNotifier | None = None,
                              root: web.Application | None = None,
                              mounts: Mapping[str, web.Application] | None = None,
                              tls_context: ssl.SSLContext | None = None) -> HttpListener:
    """Serve the FHIR API (and ``mounts``) over HTTPS on ``listen.host``:``listen.http_port``."""
    access, audit_log = record_access_from(services, settings, audit=audit, notifier=notifier)
    resolver = CallerResolver(services.directory, basic_allowed=settings.fhir.basic_auth,
                              auth_limiter=getattr(services, "auth_limiter", None)
                              or AuthLimiter(LimiterPolicy.from_settings(settings.auth)),
                              revocation=getattr(services, "revocation", None))
    root = root if root is not None else web.Application()
    root.add_subapp(settings.fhir.base_path, build_fhir_app(access, resolver, audit_log, fhir_config(settings)))
    for prefix, app in (mounts or {}).items():
        root.add_subapp(prefix, app)
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = ProxiedSite(runner, settings.listen.host, settings.listen.http_port,
                       ssl_context=tls_context or https_context(services, settings), guard=proxy_guard(services, settings))
    await site.start()
    return HttpListener(runner, [site])
