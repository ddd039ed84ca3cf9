"""`gateway smime cert import` reads a PKCS#12 password from standard input, never from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.harness import run_cli


def test_pkcs12_password_comes_from_stdin(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run_cli("init", "--demo", data_dir=data_dir, check=True)
    address = json.loads((data_dir / "demo.json").read_text())["accounts"][0]["address"]
    issued = json.loads(run_cli("certs", "issue", "smime", "--email", address, "--cn", "Demo", "--no-register",
                                "--json", data_dir=data_dir, check=True).stdout)
    key = serialization.load_pem_private_key(Path(issued["key_path"]).read_bytes(), None)
    certificate = x509.load_pem_x509_certificate(Path(issued["cert_path"]).read_bytes())
    p12 = tmp_path / "demo.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"demo", key, certificate, None, serialization.BestAvailableEncryption(b"s3cret p12")))  # type: ignore[arg-type]

    on_the_command_line = run_cli("smime", "cert", "import", address, str(p12), "--password", "s3cret p12",
                                  data_dir=data_dir)
    assert on_the_command_line.returncode == 2  # no such option
    wrong = run_cli("smime", "cert", "import", address, str(p12), "--password-stdin", data_dir=data_dir, input="nope\n")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    imported = run_cli("smime", "cert", "import", address, str(p12), "--password-stdin", "--hold-key", "--json",
                       data_dir=data_dir, input="s3cret p12\n")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["key_held"] is True
