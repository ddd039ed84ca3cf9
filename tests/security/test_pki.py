"""The test PKI: chains that the real openssl accepts, CRLs it honours, files only the owner reads."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.cli.certs import certs
from gateway.errors import Conflict, NotFound, UserError
from gateway.security import pki as pki_module
from gateway.security.pki import IssuedCertificate, TestPKI

GATEWAY_BIN = Path(sys.executable).parent / "gateway"


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    authority = TestPKI(tmp_path / "pki", organisation="HOPITAL TEST")
    authority.init()
    return authority


def openssl_verify(pki: TestPKI, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = ["openssl", "verify", "-x509_strict", *extra, "-CAfile", str(pki.root_cert_path),
               "-untrusted", str(pki.intermediate_cert_path), str(cert)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(kind).value


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return extension(cert, x509.SubjectAlternativeName)  # type: ignore[return-value]


# ------------------------------------------------------------------ the hierarchy


def test_hierarchy_has_the_igc_sante_shape(pki: TestPKI) -> None:
    root = x509.load_pem_x509_certificate(pki.root_cert_path.read_bytes())
    intermediate = x509.load_pem_x509_certificate(pki.intermediate_cert_path.read_bytes())
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "TEST AC RACINE IGC-SANTE ELEMENTAIRE"
    assert intermediate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS"
    for cert in (root, intermediate):
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "IGC-SANTE TEST"
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "HOPITAL TEST"
        assert cert.subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
        usage = extension(cert, x509.KeyUsage)
        assert usage.key_cert_sign and usage.crl_sign  # type: ignore[attr-defined]
    assert extension(root, x509.BasicConstraints) == x509.BasicConstraints(ca=True, path_length=1)
    assert extension(intermediate, x509.BasicConstraints) == x509.BasicConstraints(ca=True, path_length=0)
    assert intermediate.issuer == root.subject
    assert extension(intermediate, x509.AuthorityKeyIdentifier).key_identifier == \
        extension(root, x509.SubjectKeyIdentifier).digest  # type: ignore[attr-defined]
    bundle = x509.load_pem_x509_certificates(pki.ca_bundle_path.read_bytes())
    assert bundle == [intermediate, root]
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_rsa_pki_uses_3072_bit_keys(tmp_path: Path) -> None:
    authority = TestPKI(tmp_path / "pki", key_type="rsa")
    authority.init()
    root = x509.load_pem_x509_certificate(authority.root_cert_path.read_bytes())
    key = root.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert openssl_verify(authority, authority.issue_client("c", "client").cert_path).returncode == 0


# ------------------------------------------------------------------ issuing, checked by openssl


def issue(pki: TestPKI, kind: str, key_type: str | None = None) -> IssuedCertificate:
    if kind == "server":
        return pki.issue_server("mx", ["mx.hopital.test", "localhost"], ["127.0.0.1", "::1"], key_type=key_type)
    if kind == "client":
        return pki.issue_client("labo", "Laboratoire demo", "resultats@labo.test", key_type=key_type)
    return pki.issue_smime("claire.medecin@hopital.test", "Claire MEDECIN", key_type)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest.mark.parametrize(("kind", "purposes"), [
    ("server", ["sslserver", "sslclient"]),
    ("client", ["sslclient"]),
    ("smime", ["smimesign"]),
])
def test_openssl_verifies_chain_for_its_purposes(pki: TestPKI, kind: str, purposes: list[str], key_type: str) -> None:
    issued = issue(pki, kind, key_type)
    for purpose in purposes:
        result = openssl_verify(pki, issued.cert_path, "-purpose", purpose)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(": OK")
    # The chain file (leaf + intermediate) is what a server presents; openssl accepts it as the untrusted part.
    leaf, intermediate = x509.load_pem_x509_certificates(issued.chain_path.read_bytes())
    assert leaf == issued.certificate
    assert intermediate == x509.load_pem_x509_certificate(pki.intermediate_cert_path.read_bytes())


def test_openssl_refuses_a_certificate_for_the_wrong_purpose(pki: TestPKI) -> None:
    smime = issue(pki, "smime")
    client = issue(pki, "client")
    assert openssl_verify(pki, smime.cert_path, "-purpose", "sslserver").returncode != 0
    assert openssl_verify(pki, client.cert_path, "-purpose", "sslserver").returncode != 0


def test_openssl_refuses_a_chain_to_another_root(pki: TestPKI, tmp_path: Path) -> None:
    other = TestPKI(tmp_path / "other")
    other.init()
    result = openssl_verify(other, issue(pki, "server").cert_path)
    assert result.returncode != 0


def test_server_certificate_names_and_usages(pki: TestPKI) -> None:
    issued = pki.issue_server("mx", ["MX.Hopital.TEST.", "hôpital.test", "*.mail.test"], ["127.0.0.1", "::1"])
    cert = issued.certificate
    assert sans(cert).get_values_for_type(x509.DNSName) == ["mx.hopital.test", "xn--hpital-ixa.test", "*.mail.test"]
    assert [str(ip) for ip in sans(cert).get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mx.hopital.test"
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.SERVER_AUTH,  # type: ignore[call-overload]
                                                            ExtendedKeyUsageOID.CLIENT_AUTH]
    assert extension(cert, x509.BasicConstraints) == x509.BasicConstraints(ca=False, path_length=None)
    points = extension(cert, x509.CRLDistributionPoints)
    uri = points[0].full_name[0].value  # type: ignore[index]
    assert uri == pki.intermediate_crl_path.as_uri() and pki.intermediate_crl_path.is_file()
    assert extension(cert, x509.AuthorityKeyIdentifier).key_identifier == extension(  # type: ignore[attr-defined]
        x509.load_pem_x509_certificate(pki.intermediate_cert_path.read_bytes()), x509.SubjectKeyIdentifier).digest  # type: ignore[attr-defined]


def test_server_certificate_needs_a_dns_name(pki: TestPKI) -> None:
    with pytest.raises(UserError, match="at least one DNS name") as caught:
        pki.issue_server("mx", [], ["127.0.0.1"])
    assert caught.value.field == "dns"
    with pytest.raises(UserError) as bad_ip:
        pki.issue_server("mx", ["localhost"], ["300.1.1.1"])
    assert bad_ip.value.field == "ip"


def test_client_certificate_carries_the_mailbox(pki: TestPKI) -> None:
    cert = issue(pki, "client").certificate
    assert sans(cert).get_values_for_type(x509.RFC822Name) == ["resultats@labo.test"]
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # type: ignore[call-overload]
    anonymous = pki.issue_client("operator", "Operateur B").certificate
    with pytest.raises(x509.ExtensionNotFound):
        anonymous.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize(("key_type", "third_usage"), [("ec", "key_agreement"), ("rsa", "key_encipherment")])
def test_smime_certificate_follows_rfc8550(pki: TestPKI, key_type: str, third_usage: str) -> None:
    issued = pki.issue_smime("Claire.Medecin@Hôpital.test", "Claire MEDECIN", key_type)
    cert = issued.certificate
    assert sans(cert).get_values_for_type(x509.RFC822Name) == ["Claire.Medecin@xn--hpital-ixa.test"]
    assert list(extension(cert, x509.ExtendedKeyUsage)) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]  # type: ignore[call-overload]
    usage = extension(cert, x509.KeyUsage)
    assert usage.digital_signature and getattr(usage, third_usage)  # type: ignore[attr-defined]
    assert not usage.key_cert_sign  # type: ignore[attr-defined]
    expected_key = rsa.RSAPublicKey if key_type == "rsa" else ec.EllipticCurvePublicKey
    assert isinstance(cert.public_key(), expected_key)
    assert issued.name == "Claire.Medecin@xn--hpital-ixa.test"


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_smime_certificate_works_with_openssl_cms(pki: TestPKI, tmp_path: Path, key_type: str) -> None:
    # OpenSSL's "smimeencrypt" purpose only knows keyEncipherment, so an ECDH certificate (keyAgreement,
    # RFC 8550 4.4.2) is checked by really encrypting to it, signing with it and verifying the signature.
    issued = issue(pki, "smime", key_type)
    message = tmp_path / "message.txt"
    message.write_text("Compte rendu de biologie\n")

    def cms(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["openssl", "cms", *args], capture_output=True, check=False)

    encrypted = cms("-encrypt", "-aes-256-cbc", "-in", str(message), "-out", str(tmp_path / "enc.p7m"),
                    str(issued.cert_path))
    assert encrypted.returncode == 0, encrypted.stderr
    decrypted = cms("-decrypt", "-in", str(tmp_path / "enc.p7m"), "-recip", str(issued.cert_path),
                    "-inkey", str(issued.key_path))
    assert decrypted.returncode == 0 and decrypted.stdout.replace(b"\r\n", b"\n") == b"Compte rendu de biologie\n"
    # The signer ships its intermediate in the CMS certificates field (RFC 5652 5.1) for the verifier.
    signed = cms("-sign", "-in", str(message), "-signer", str(issued.cert_path), "-inkey", str(issued.key_path),
                 "-certfile", str(pki.intermediate_cert_path), "-out", str(tmp_path / "signed.p7m"))
    assert signed.returncode == 0, signed.stderr
    verified = cms("-verify", "-in", str(tmp_path / "signed.p7m"), "-CAfile", str(pki.root_cert_path),
                   "-purpose", "smimesign", "-out", str(tmp_path / "verified.txt"))
    assert verified.returncode == 0, verified.stderr


def test_one_rsa_certificate_in_an_ec_pki(pki: TestPKI) -> None:
    issued = pki.issue_smime("rsa@hopital.test", "RSA user", key_type="rsa")
    key = issued.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert openssl_verify(pki, issued.cert_path, "-purpose", "smimeencrypt").returncode == 0


# ------------------------------------------------------------------ revocation


def test_revoked_certificate_fails_openssl_crl_check(pki: TestPKI) -> None:
    client = issue(pki, "client")
    other = issue(pki, "server")
    crl_args = ("-crl_check_all", "-CRLfile", str(pki.intermediate_crl_path), "-CRLfile", str(pki.root_crl_path))
    assert openssl_verify(pki, client.cert_path, *crl_args).returncode == 0
    pki.revoke("labo", "keyCompromise")
    pki.crl()
    refused = openssl_verify(pki, client.cert_path, *crl_args)
    assert refused.returncode != 0 and "certificate revoked" in refused.stderr
    assert openssl_verify(pki, other.cert_path, *crl_args).returncode == 0


def test_crl_content(pki: TestPKI) -> None:
    client = issue(pki, "client")
    first = x509.load_pem_x509_crl(pki.intermediate_crl_path.read_bytes())
    pki.revoke(client.serial_hex.upper(), "key-compromise")
    pem = pki.crl()
    crl = x509.load_pem_x509_crl(pem.encode())
    intermediate = x509.load_pem_x509_certificate(pki.intermediate_cert_path.read_bytes())
    assert crl.is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(client.certificate.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    number = lambda c: c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
    assert number(crl) > number(first)
    root_crl = x509.load_pem_x509_crl(pki.root_crl_path.read_bytes())
    root = x509.load_pem_x509_certificate(pki.root_cert_path.read_bytes())
    assert root_crl.is_signature_valid(root.public_key()) and len(root_crl) == 0  # type: ignore[arg-type]


def test_revocation_errors(pki: TestPKI) -> None:
    issue(pki, "client")
    with pytest.raises(UserError, match="not a revocation reason"):
        pki.revoke("labo", "because")
    with pytest.raises(NotFound):
        pki.revoke("nobody")
    with pytest.raises(UserError, match="is a CA"):
        pki.revoke("intermediate")
    pki.revoke("labo")
    with pytest.raises(Conflict, match="was revoked"):
        pki.revoke("labo")


def test_same_name_needs_replace_and_supersedes(pki: TestPKI) -> None:
    first = issue(pki, "server")
    with pytest.raises(Conflict, match="--replace"):
        issue(pki, "server")
    second = pki.issue_server("mx", ["mx.hopital.test"], [], replace=True)
    assert second.serial_hex != first.serial_hex
    assert pki.load("mx").serial_hex == second.serial_hex
    states = {row["serial"]: (row["state"], row["reason"]) for row in pki.list()}
    assert states[first.serial_hex] == ("revoked", "superseded")
    assert states[second.serial_hex] == ("valid", None)
    crl = x509.load_pem_x509_crl(pki.intermediate_crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.certificate.serial_number) is not None


# ------------------------------------------------------------------ listing and loading


def test_list_reports_states_and_paths(pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    issue(pki, "client")
    issue(pki, "smime")
    pki.revoke("labo", "cessationOfOperation")
    rows = {row["name"]: row for row in pki.list()}
    assert set(rows) == {"root", "intermediate", "labo", "claire.medecin@hopital.test"}
    assert rows["labo"]["state"] == "revoked" and rows["labo"]["reason"] == "cessationOfOperation"
    assert rows["claire.medecin@hopital.test"]["state"] == "valid"
    assert rows["claire.medecin@hopital.test"]["kind"] == "smime"
    assert rows["labo"]["key_path"] == str(pki.root / "issued" / "labo.key")
    later = pki_module._now() + timedelta(days=900)
    monkeypatch.setattr(pki_module, "_now", lambda: later)
    assert {row["name"]: row["state"] for row in pki.list()}["claire.medecin@hopital.test"] == "expired"


def test_load_and_describe(pki: TestPKI) -> None:
    issued = issue(pki, "server")
    loaded = pki.load("mx")
    assert loaded.certificate == issued.certificate and loaded.kind == "server"
    assert pki.load("root").cert_path == pki.root_cert_path
    details = pki.describe("mx")
    assert details["dns_names"] == ["mx.hopital.test", "localhost"]
    assert details["extended_key_usage"] == ["serverAuth", "clientAuth"]
    assert details["fingerprint_sha256"] == issued.fingerprint_sha256
    with pytest.raises(NotFound):
        pki.load("absent")


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "", "spaces here", "x" * 200])
def test_names_cannot_escape_the_directory(pki: TestPKI, name: str) -> None:
    with pytest.raises(UserError) as caught:
        pki.issue_client(name, "client")
    assert caught.value.field == "name"
    assert not list((pki.root / "issued").iterdir())


def test_ca_names_are_reserved(pki: TestPKI) -> None:
    with pytest.raises(UserError, match="is the name of a CA"):
        pki.issue_client("root", "client")


def test_issuing_before_init_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="certs init"):
        TestPKI(tmp_path / "none").issue_client("c", "client")


# ------------------------------------------------------------------ files on disk


def test_private_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        authority = TestPKI(tmp_path / "pki")
        authority.init()
        issue(authority, "server")
        issue(authority, "smime", "rsa")
        authority.revoke("mx")
    finally:
        os.umask(previous)
    keys = sorted(authority.root.rglob("*.key"))
    assert len(keys) == 4
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for directory in [authority.root, *(p for p in authority.root.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert not list(authority.root.rglob("*.tmp")), "temporary files left behind"


def test_init_is_refused_twice_unless_forced(pki: TestPKI) -> None:
    old_root = pki.root_cert_path.read_bytes()
    issue(pki, "client")
    with pytest.raises(Conflict, match="already exists"):
        pki.init()
    assert pki.root_cert_path.read_bytes() == old_root
    pki.init(force=True)
    assert pki.root_cert_path.read_bytes() != old_root
    assert [row["name"] for row in pki.list()] == ["root", "intermediate"]
    assert not (pki.root / "issued" / "labo.key").exists()


# ------------------------------------------------------------------ the gateway's own certificate


def test_gateway_certificate_is_created_once_and_renewed_when_names_change(tmp_path: Path) -> None:
    authority = TestPKI(tmp_path / "pki")
    first = authority.ensure_gateway_server_cert("mx.demo.test", ["localhost"], ["127.0.0.1", "::1"])
    assert authority.exists()
    assert sans(first.certificate).get_values_for_type(x509.DNSName) == ["mx.demo.test", "localhost"]
    again = authority.ensure_gateway_server_cert("mx.demo.test", ["localhost"], ["127.0.0.1", "::1"])
    assert again.serial_hex == first.serial_hex
    renamed = authority.ensure_gateway_server_cert("mx.demo.test", ["localhost", "webmail.demo.test"], ["127.0.0.1"])
    assert renamed.serial_hex != first.serial_hex
    assert "webmail.demo.test" in sans(renamed.certificate).get_values_for_type(x509.DNSName)
    assert openssl_verify(authority, renamed.cert_path, "-purpose", "sslserver").returncode == 0


def test_gateway_certificate_with_an_ip_hostname(tmp_path: Path) -> None:
    authority = TestPKI(tmp_path / "pki")
    issued = authority.ensure_gateway_server_cert("127.0.0.1", ["localhost"], [])
    assert sans(issued.certificate).get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans(issued.certificate).get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_gateway_certificate_replaced_after_revocation(tmp_path: Path) -> None:
    authority = TestPKI(tmp_path / "pki")
    first = authority.ensure_gateway_server_cert("localhost", [], ["127.0.0.1"])
    authority.revoke("gateway", "keyCompromise")
    second = authority.ensure_gateway_server_cert("localhost", [], ["127.0.0.1"])
    assert second.serial_hex != first.serial_hex
    assert {row["serial"]: row["reason"] for row in authority.list()}[first.serial_hex] == "keyCompromise"


# ------------------------------------------------------------------ the CLI


def run_gateway(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    return subprocess.run([str(GATEWAY_BIN), "--data-dir", str(data_dir), *args], capture_output=True, text=True,
                          env=environ, check=False)


def test_cli_init_twice_is_refused_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = run_gateway(data, "certs", "init")
    assert created.returncode == 0, created.stderr
    assert (data / "pki" / "ca" / "chain.pem").is_file()
    again = run_gateway(data, "certs", "init")
    assert again.returncode == 1
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    forced = run_gateway(data, "certs", "init", "--force")
    assert forced.returncode == 0, forced.stderr


def invoke(data: Path, *args: str) -> tuple[int, str]:
    """Run ``certs ARGS`` in-process; --data-dir goes after the leaf command (``issue server``, ``list``...)."""
    depth = 2 if args[0] == "issue" else 1
    result = CliRunner().invoke(certs, [*args[:depth], "--data-dir", str(data), *args[depth:]])
    return result.exit_code, result.output


def test_cli_issue_list_show_revoke_crl(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert invoke(data, "init")[0] == 0
    code, out = invoke(data, "issue", "server", "--name", "mx", "--dns", "mx.test,localhost", "--ip", "127.0.0.1",
                       "--json")
    assert code == 0, out
    assert json.loads(out)["dns_names"] == ["mx.test", "localhost"]
    code, out = invoke(data, "issue", "smime", "--email", "a@b.test", "--cn", "A B", "--no-register", "--json")
    assert code == 0 and json.loads(out)["key"] == "rsa 3072"  # RSA by default for S/MIME (gpgsm 2.2: no EC keys)
    assert json.loads(out)["registered"] is False
    code, out = invoke(data, "issue", "smime", "--email", "a@b.test", "--cn", "A B", "--name", "a2")
    assert code == 1 and "no mailbox a@b.test here" in out and "--no-register" in out
    assert "a2" not in {row["name"] for row in json.loads(invoke(data, "list", "--json")[1])}  # nothing issued
    code, out = invoke(data, "issue", "client", "--name", "app", "--cn", "App", "--email", "app@b.test")
    assert code == 0 and "app@b.test" in out
    code, out = invoke(data, "revoke", "app", "--reason", "superseded")
    assert code == 0 and "revoked app" in out
    code, out = invoke(data, "list", "--json")
    assert {row["name"]: row["state"] for row in json.loads(out)}["app"] == "revoked"
    code, out = invoke(data, "crl")
    assert code == 0 and out.split() == [str(data / "pki" / "crl" / "intermediate.crl.pem"),
                                         str(data / "pki" / "crl" / "root.crl.pem")]
    code, out = invoke(data, "show", "mx")
    assert code == 0 and "serverAuth, clientAuth" in out
    code, out = invoke(data, "issue", "client", "--name", "../x", "--cn", "x")
    assert code == 1 and "name:" in out
