"""Revocation that takes effect at once: CRLs and trust files re-read when they change, no restart.

Two checks, both cheap (a ``stat`` of each watched file per new connection or login):

- ``ReloadingContexts``: every listener's TLS context is served through an SNI callback (OpenSSL
  calls it on every handshake, with or without SNI) that swaps in a context rebuilt from the
  certificate, key, CA bundle, trust anchors and CRL files whenever one of them changed; the
  handshake then verifies the client's certificate against the CRLs as they are now (RFC 5280 6.3);
- ``RevocationList``: every certificate login (SASL EXTERNAL on SMTP and IMAP, the FHIR API's client
  certificate) asks it too, because the TLS connection may have been set up before the revocation.

SIGHUP forces both to re-read everything (``gateway serve`` wires it). A file that cannot be read or
parsed keeps the previous state and is logged: a half-copied CRL must not switch revocation off.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.errors import UserError
from gateway.security.server_identity import ServerCertificate
from gateway.security.tls import server_context

log = logging.getLogger("gateway.security")

PathSource = Callable[[], Iterable[Path]]
_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
Signature = tuple[tuple[str, int, int], ...]


def _signature(paths: Iterable[Path]) -> Signature:
    """What changes when a file is rewritten (mtime in ns, size, inode: an atomic rename changes it)."""
    result = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            result.append((str(path), -1, -1))
            continue
        result.append((str(path), status.st_mtime_ns ^ status.st_ino, status.st_size))
    return tuple(result)


class WatchedFiles:
    """``changed()`` is True the first time and whenever one of the files differs from the last look."""

    def __init__(self, paths: PathSource) -> None:
        self._paths = paths
        self._last: Signature | None = None

    def changed(self) -> bool:
        current = _signature(self._paths())
        if current == self._last:
            return False
        self._last = current
        return True

    def forget(self) -> None:
        self._last = None


class RevocationList:
    """(issuer, serial) of every certificate revoked by the CRLs in ``paths`` (PEM, several per file)."""

    def __init__(self, paths: PathSource) -> None:
        self._paths = paths
        self._files = WatchedFiles(paths)
        self._revoked: frozenset[tuple[bytes, int]] = frozenset()

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        self._refresh()
        return (certificate.issuer.public_bytes(), certificate.serial_number) in self._revoked

    def is_revoked_der(self, der: bytes) -> bool:
        return self.is_revoked(x509.load_der_x509_certificate(der))

    def peer_is_revoked(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bool:
        """Whether the TLS peer's certificate (if any) is revoked now."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return False
        return self.is_revoked_der(der)

    def reload(self) -> None:
        self._files.forget()
        self._refresh()

    def _refresh(self) -> None:
        if not self._files.changed():
            return
        revoked: set[tuple[bytes, int]] = set()
        for path in self._paths():
            try:
                data = path.read_bytes()
                crls = [x509.load_pem_x509_crl(block) for block in _CRL_BLOCK.findall(data)]
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as error:
                log.error("CRL %s unreadable, keeping the previous revocations: %s", path, error)
                self._files.forget()
                return
            for crl in crls:
                issuer = crl.issuer.public_bytes()
                revoked.update((issuer, entry.serial_number) for entry in crl)
        self._revoked = frozenset(revoked)
        log.info("revocation lists loaded: %d revoked certificates", len(revoked))


class _ReloadingContext:
    def __init__(self, build: Callable[[], ssl.SSLContext], files: PathSource) -> None:
        self._build = build
        self._files = WatchedFiles(files)
        self._files.changed()
        self._current = build()
        self.listener = build()
        self.listener.sni_callback = self._swap

    def current(self) -> ssl.SSLContext:
        if self._files.changed():
            try:
                self._current = self._build()
                log.info("TLS context rebuilt: certificate, trust or CRL files changed")
            except (ssl.SSLError, OSError, ValueError, UserError) as error:
                log.error("TLS files changed but cannot be loaded, keeping the previous context: %s", error)
                self._files.forget()
        return self._current

    def reload(self) -> None:
        self._files.forget()
        self.current()

    def _swap(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              context: ssl.SSLContext) -> None:
        # Called by OpenSSL on each handshake before the client's certificate is asked for.
        fresh = self.current()
        if ssl_object.context is not fresh:
            ssl_object.context = fresh


class ReloadingContexts:
    """The listeners' TLS contexts, each re-read when one of its files changes; ``reload()`` on SIGHUP."""

    def __init__(self) -> None:
        self._contexts: list[_ReloadingContext] = []

    def server(self, build: Callable[[], ssl.SSLContext], files: Sequence[Path] | PathSource) -> ssl.SSLContext:
        """The context to give a listener: built by ``build``, rebuilt when ``files`` change."""
        source: PathSource = files if callable(files) else (lambda: files)
        reloading = _ReloadingContext(build, source)
        self._contexts.append(reloading)
        return reloading.listener

    def reload(self) -> None:
        for context in self._contexts:
            context.reload()


def optional_client_certificate_context(services: Any, hostname: str, server_names: Sequence[str],
                                        server_ips: Sequence[str]) -> ssl.SSLContext:
    """The IMAP and HTTPS listeners' context: the gateway's certificate (``services.server_certificate``: the
    operator's ``tls.*`` files or the test PKI's); a client certificate optional, verified against the CA
    bundle and the CRLs as they are at each handshake (``services.tls_contexts``; without it, as they are now)."""
    identity: ServerCertificate | None = getattr(services, "server_certificate", None)
    if identity is None:   # a test's services without one: the test PKI's certificate
        issued = services.pki.ensure_gateway_server_cert(hostname, server_names, server_ips)
        fixed = (issued.chain_path, issued.key_path)
        paths: Callable[[], tuple[Path, Path]] = lambda: fixed
        watched: Callable[[], tuple[Path, ...]] = lambda: fixed
    else:
        paths, watched = identity.paths, identity.watched
    all_crls = tuple(getattr(services.pki, "crl_paths", ()))

    def build() -> ssl.SSLContext:
        chain, key = paths()
        return server_context(chain, key, client_ca=services.pki.ca_bundle_path,
                              require_client_cert=False, crls=[path for path in all_crls if path.is_file()])
    reloading: ReloadingContexts | None = getattr(services, "tls_contexts", None)
    if reloading is None:
        return build()
    return reloading.server(build, lambda: (*watched(), services.pki.ca_bundle_path, *all_crls))
