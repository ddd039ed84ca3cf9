"""``gateway certs``: the test PKI (IGC-Santé style) and the certificates it issues."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from gateway.cli.common import (
    data_dir_option,
    emit_record,
    emit_rows,
    json_option,
    settings,
    split_csv,
    user_errors,
    with_services,
)
from gateway.errors import NotFound
from gateway.security.pki import REVOCATION_REASONS, IssuedCertificate, TestPKI

LIST_COLUMNS = ["name", "kind", "state", "serial", "not_after", "subject"]
ISSUED_FIELDS = ["name", "kind", "subject", "serial", "not_after", "dns_names", "ip_addresses", "emails",
                 "key", "fingerprint_sha256", "cert_path", "key_path", "chain_path"]


def _pki() -> TestPKI:
    return TestPKI.from_settings(settings())


def _key_type_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--key-type", type=click.Choice(["ec", "rsa"]), default=None,
                        help="ec (P-256) or rsa (3072 bits); default: the pki.key_type setting")(func)


def _replace_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--replace", is_flag=True,
                        help="re-issue when the name exists; the old certificate is revoked as superseded")(func)


def _emit_issued(pki: TestPKI, issued: IssuedCertificate, as_json: bool) -> None:
    details = pki.describe(issued.name)
    emit_record({key: details[key] for key in ISSUED_FIELDS}, as_json=as_json)


@click.group()
def certs() -> None:
    """Test PKI: root and intermediate CAs, server, client and S/MIME certificates, CRLs."""


@certs.command("init")
@data_dir_option
@click.option("--force", is_flag=True, help="replace an existing PKI (everything it issued stops being trusted)")
@user_errors
def init_pki(force: bool) -> None:
    """Create the root and intermediate CAs and their (empty) CRLs."""
    pki = _pki()
    pki.init(force=force)
    click.echo(f"test PKI created in {pki.root}")
    click.echo(f"trust bundle for clients and peers: {pki.ca_bundle_path}")


@certs.group()
def issue() -> None:
    """Issue a server, client or S/MIME certificate."""


@issue.command("server")
@data_dir_option
@click.option("--name", required=True, help="file name under issued/ (letters, digits, . _ @ -)")
@click.option("--dns", "dns_names", multiple=True, required=True,
              help="DNS name clients connect with (repeat or comma-separate); the first is the CN")
@click.option("--ip", "ips", multiple=True, help="IP address clients connect with (repeat or comma-separate)")
@_key_type_option
@_replace_option
@json_option
@user_errors
def issue_server(name: str, dns_names: tuple[str, ...], ips: tuple[str, ...], key_type: str | None,
                 replace: bool, as_json: bool) -> None:
    """TLS server certificate (serverAuth + clientAuth: it is also our certificate towards operators)."""
    pki = _pki()
    issued = pki.issue_server(name, split_csv(dns_names), split_csv(ips), key_type=key_type, replace=replace)
    _emit_issued(pki, issued, as_json)


@issue.command("client")
@data_dir_option
@click.option("--name", required=True, help="file name under issued/ (letters, digits, . _ @ -)")
@click.option("--cn", "common_name", required=True, help="subject common name (an application, an operator)")
@click.option("--email", help="mailbox address put in the SAN (for SASL EXTERNAL)")
@_key_type_option
@_replace_option
@json_option
@user_errors
def issue_client(name: str, common_name: str, email: str | None, key_type: str | None, replace: bool,
                 as_json: bool) -> None:
    """TLS client certificate (clientAuth) for an application or an operator."""
    pki = _pki()
    issued = pki.issue_client(name, common_name, email, key_type=key_type, replace=replace)
    _emit_issued(pki, issued, as_json)


@issue.command("smime")
@data_dir_option
@click.option("--email", required=True, help="the mailbox address (SAN rfc822Name)")
@click.option("--cn", "common_name", required=True, help="subject common name (the person or service)")
@click.option("--name", help="file name under issued/ (default: the address)")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True,
              help="rsa (3072 bits) by default: mail clients such as gpgsm 2.2 cannot import an EC P-256 S/MIME key")
@click.option("--hold-key", is_flag=True,
              help="the gateway also holds the key (sealed): it signs what the mailbox sends and decrypts its mail")
@click.option("--no-publish", is_flag=True, help="register without publishing (not used to encrypt to the mailbox)")
@click.option("--no-register", is_flag=True,
              help="only issue the files, for an address that is not a mailbox here (by default the certificate "
                   "is registered to the mailbox, as `smime cert import` would)")
@_replace_option
@json_option
def issue_smime(email: str, common_name: str, name: str | None, key_type: str, hold_key: bool, no_publish: bool,
                no_register: bool, replace: bool, as_json: bool) -> None:
    """S/MIME certificate (emailProtection) for signing and encryption, registered to its mailbox in one step."""
    if no_register and (hold_key or no_publish):
        raise click.UsageError("--hold-key and --no-publish are about the registration that --no-register skips")

    async def action(services: Any) -> dict[str, Any]:
        pki: TestPKI = services.pki
        if not no_register:
            await _require_mailbox(services, email)  # refuse before issuing: no orphan certificate
        issued = pki.issue_smime(email, common_name, key_type, name=name, replace=replace)
        details = pki.describe(issued.name)
        record = {key: details[key] for key in ISSUED_FIELDS}
        if no_register:
            return record | {"registered": False}
        key_path = Path(details["key_path"])
        registered = await services.smime.import_certificate(
            email, Path(details["cert_path"]).read_bytes(), key_data=key_path.read_bytes() if hold_key else None,
            hold_key=hold_key, publish=not no_publish)
        return record | {"registered": True, "published": registered.get("published"),
                         "key_held": registered.get("key_held")}

    emit_record(with_services(action), as_json=as_json)


async def _require_mailbox(services: Any, address: str) -> None:
    try:
        await services.directory.show_mailbox(address)
    except NotFound:
        raise NotFound(f"no mailbox {address} here to register the certificate to: create the mailbox first, "
                       "or issue with --no-register", field="email") from None


@certs.command("revoke")
@data_dir_option
@click.argument("name_or_serial")
@click.option("--reason", default="unspecified", show_default=True,
              help="RFC 5280 reason: " + ", ".join(flag.value for flag in REVOCATION_REASONS.values()))
@user_errors
def revoke(name_or_serial: str, reason: str) -> None:
    """Revoke a certificate; the CRLs are rewritten at once."""
    pki = _pki()
    record = pki.revoke(name_or_serial, reason)
    click.echo(f"revoked {record['name']} (serial {record['serial']}, reason {record['reason']}); "
               f"CRL rewritten: {pki.intermediate_crl_path}")


@certs.command("list")
@data_dir_option
@json_option
@user_errors
def list_certificates(as_json: bool) -> None:
    """Every certificate of the PKI with its state (valid, revoked, expired)."""
    emit_rows(_pki().list(), LIST_COLUMNS, as_json=as_json)


@certs.command("crl")
@data_dir_option
@user_errors
def crl() -> None:
    """Re-sign the CRLs (fresh next update) and print where they are."""
    pki = _pki()
    pki.crl()
    for path in pki.crl_paths:
        click.echo(str(path))


@certs.command("show")
@data_dir_option
@click.argument("name_or_serial")
@json_option
@user_errors
def show(name_or_serial: str, as_json: bool) -> None:
    """One certificate in detail: names, usages, fingerprint, files."""
    emit_record(_pki().describe(name_or_serial), as_json=as_json)
