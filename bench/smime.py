"""S/MIME throughput of the gateway's own code (gateway.security.smime): a 100 KB message.

- sign+encrypt: ``process_outgoing`` (RFC 8551 3.7: sign, then encrypt), as the pipeline does for a
  submission whose policy asks for both;
- decrypt+verify: ``process_incoming`` with the recipient's key, path validation to the anchors and
  the CRL check, as the pipeline does for a message reaching a mailbox whose key the gateway holds.

For EC P-256 (the test PKI's default) and RSA 3072 certificates, AES-256-CBC. One process, one core.

    .venv/bin/python bench/smime.py [--seconds 5] [--size 102400]
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.security.pki import TestPKI
from gateway.security.smime import (
    ContentCipher,
    OutgoingOptions,
    RecipientKey,
    SigningIdentity,
    SmimeStatus,
    process_incoming,
    process_outgoing,
)


def _message(size: int) -> bytes:
    header = (b"From: claire.medecin@demo.mssante.localhost\r\nTo: marc.pharmacien@demo.mssante.localhost\r\n"
              b"Subject: Compte rendu\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
              b"Content-Transfer-Encoding: base64\r\n\r\n")
    body = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return header + body


def _identity(pki: TestPKI, address: str, key_type: str) -> tuple[x509.Certificate, object]:
    issued = pki.issue_smime(address, address.split("@")[0], key_type, name=f"bench-{key_type}-{address}")
    certificate = x509.load_pem_x509_certificate(issued.cert_path.read_bytes())
    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
    return certificate, key


def _rate(work: Callable[[], object], seconds: float) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        done += 1
    return done / (time.perf_counter() - start)


def run(key_type: str, size: int, seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as directory:
        pki = TestPKI(Path(directory), key_type=key_type)
        pki.init()
        sender_cert, sender_key = _identity(pki, "claire.medecin@demo.mssante.localhost", key_type)
        recipient_cert, recipient_key = _identity(pki, "marc.pharmacien@demo.mssante.localhost", key_type)
        intermediate = x509.load_pem_x509_certificate(pki.intermediate_cert_path.read_bytes())
        root = x509.load_pem_x509_certificate(pki.root_cert_path.read_bytes())
        crls = [x509.load_pem_x509_crl(path.read_bytes()) for path in pki.crl_paths]
        identity = SigningIdentity(sender_cert, sender_key, (intermediate,))  # type: ignore[arg-type]
        options = OutgoingOptions(cipher=ContentCipher.AES256_CBC)
        message = _message(size)

        def protect() -> bytes:
            return process_outgoing(message, sign_with=identity, encrypt_to=[recipient_cert], options=options)

        sealed = protect()
        keys = [RecipientKey(recipient_cert, recipient_key)]  # type: ignore[arg-type]

        def open_and_check() -> object:
            result = process_incoming(sealed, keys=keys, trust_anchors=[root], intermediates=[intermediate],
                                      crls=crls, now=datetime.now(timezone.utc))
            assert result.status is SmimeStatus.PASS, result.reasons
            return result

        return _rate(protect, seconds), _rate(open_and_check, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure")
    parser.add_argument("--size", type=int, default=100 * 1024, help="message size in octets")
    arguments = parser.parse_args()
    print(f"S/MIME, {arguments.size // 1024} KB message, AES-256-CBC, one core")
    print(f"{'key':<10} {'sign+encrypt /s':>16} {'decrypt+verify /s':>18}")
    for key_type, label in (("ec", "EC P-256"), ("rsa", "RSA 3072")):
        outgoing, incoming = run(key_type, arguments.size, arguments.seconds)
        print(f"{label:<10} {outgoing:>16.1f} {incoming:>18.1f}")


if __name__ == "__main__":
    main()
