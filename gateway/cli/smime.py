"""``gateway smime``: S/MIME certificates of mailboxes (import, publish, revoke, state, expiry) and policies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli.common import data_dir_option, emit_record, emit_rows, json_option, with_services

if TYPE_CHECKING:
    from gateway.app import Services

CERT_COLUMNS = ["address", "state", "reason", "not_after", "published", "key_held", "key", "fingerprint"]
POLICY_COLUMNS = ["scope", "target", "sign", "encrypt", "updated_at"]
REQUIREMENTS = click.Choice(["always", "when-available", "never", "inherit"])


def _short(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "fingerprint": entry["fingerprint"][:16]}


@click.group()
def smime() -> None:
    """S/MIME (RFC 8551): mailbox certificates and keys in the directory, signing and encryption policy."""


@smime.group("cert")
def cert() -> None:
    """A mailbox's S/MIME certificates: import, publish, list with state, revoke, expiry warnings."""


@cert.command("import")
@data_dir_option
@click.argument("address")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="its private key (PEM or DER); with --hold-key the gateway keeps it, sealed at rest")
@click.option("--password-stdin", is_flag=True,
              help="read the password of the key or PKCS#12 file from the first line of standard input "
                   "(never on the command line, where `ps` and the shell history would show it)")
@click.option("--hold-key", is_flag=True,
              help="the owner lets the gateway hold the key: it decrypts their mail and signs what they send")
@click.option("--no-publish", is_flag=True, help="register without publishing (not used to encrypt to them)")
@json_option
def import_certificate(address: str, certificate: Path, key_path: Path | None, password_stdin: bool,
                       hold_key: bool, no_publish: bool, as_json: bool) -> None:
    """Import CERTIFICATE (PEM, DER or PKCS#12) for the mailbox ADDRESS."""
    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else None

    async def action(services: Services) -> dict[str, Any]:
        return await services.smime.import_certificate(
            address, certificate.read_bytes(), key_data=key_path.read_bytes() if key_path else None,
            password=password.encode() if password else None, hold_key=hold_key, publish=not no_publish)

    emit_record(_short(with_services(action)), as_json=as_json)


@cert.command("list")
@data_dir_option
@click.argument("address", required=False)
@json_option
def list_certificates(address: str | None, as_json: bool) -> None:
    """Certificates (of ADDRESS, or all) with their state: valid, expiring, expired, revoked, untrusted."""

    async def action(services: Services) -> list[dict[str, Any]]:
        return await services.smime.list_certificates(address)

    emit_rows([_short(e) for e in with_services(action)], CERT_COLUMNS, as_json=as_json)


@cert.command("expiring")
@data_dir_option
@click.option("--days", type=int, default=30, show_default=True, help="warn about certificates expiring within")
@json_option
def expiring(days: int, as_json: bool) -> None:
    """Certificates expired or expiring within DAYS; exits 3 when there are some (for monitoring)."""

    async def action(services: Services) -> list[dict[str, Any]]:
        return await services.smime.expiring(days)

    found = with_services(action)
    emit_rows([_short(e) for e in found], CERT_COLUMNS, as_json=as_json, title=f"expiring within {days} days")
    if found:
        raise SystemExit(3)


@cert.command("publish")
@data_dir_option
@click.argument("fingerprint")
@click.option("--withdraw", is_flag=True, help="withdraw from the directory instead")
@json_option
def publish(fingerprint: str, withdraw: bool, as_json: bool) -> None:
    """Publish a certificate (FINGERPRINT: 8+ hex digits of its SHA-256) so senders encrypt to it."""

    async def action(services: Services) -> dict[str, Any]:
        return await services.smime.set_published(fingerprint, not withdraw)

    emit_record(_short(with_services(action)), as_json=as_json)


@cert.command("revoke")
@data_dir_option
@click.argument("fingerprint")
@click.option("--reason", default="unspecified", show_default=True, help="RFC 5280 5.3.1 reason")
@json_option
def revoke(fingerprint: str, reason: str, as_json: bool) -> None:
    """Revoke a certificate in the directory: never encrypted to or signed with again; its held key is erased."""

    async def action(services: Services) -> dict[str, Any]:
        return await services.smime.revoke(fingerprint, reason)

    emit_record(_short(with_services(action)), as_json=as_json)


@smime.group("policy")
def policy() -> None:
    """Per-mailbox and per-domain policy: sign and encrypt always / when-available / never."""


@policy.command("set")
@data_dir_option
@click.argument("target")
@click.argument("settings", nargs=-1, required=True)
@json_option
def set_policy(target: str, settings: tuple[str, ...], as_json: bool) -> None:
    """TARGET is a mailbox address or a domain; SETTINGS are sign=VALUE and/or encrypt=VALUE
    (always, when-available, never, inherit)."""
    values: dict[str, str] = {}
    for setting in settings:
        name, _, value = setting.partition("=")
        if name not in ("sign", "encrypt") or not value:
            raise click.BadParameter(f"{setting!r}: write sign=VALUE or encrypt=VALUE", param_hint="SETTINGS")
        values[name] = REQUIREMENTS.convert(value, None, None)

    async def action(services: Services) -> dict[str, Any]:
        return await services.smime.set_policy(target, **values)

    emit_record(with_services(action), as_json=as_json)


@policy.command("list")
@data_dir_option
@json_option
def list_policies(as_json: bool) -> None:
    """Every policy row (the defaults are the [smime] settings)."""

    async def action(services: Services) -> list[dict[str, Any]]:
        return await services.smime.list_policies()

    emit_rows(with_services(action), POLICY_COLUMNS, as_json=as_json)


@policy.command("show")
@data_dir_option
@click.argument("address")
@json_option
def show_policy(address: str, as_json: bool) -> None:
    """The policy that applies to ADDRESS, and where it comes from (mailbox, domain, default)."""

    async def action(services: Services) -> dict[str, Any]:
        resolved = await services.smime.policy_for(address)
        return {"address": address, "sign": resolved.sign.value, "encrypt": resolved.encrypt.value,
                "source": resolved.source}

    emit_record(with_services(action), as_json=as_json)
