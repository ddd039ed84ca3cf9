"""Postfix as a third operator (p.mssante.localhost): mail both ways with the gateway (operator A),
mutually authenticated TLS on each hop.

    gateway A  a.mssante.localhost  mx.a.mssante.localhost  127.0.0.2   MX found through dnsmasq
    Postfix P  p.mssante.localhost  mx.p.mssante.localhost  127.0.0.5   route to A in transport_maps

P's certificate is issued under A's PKI (both hold certificates of the same health PKI, as
MSSanté operators all hold IGC-Santé certificates); each side verifies the other's certificate
and its name.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import free_ports
from tests.interop.operators import TrustSpace, wait_for
from tests.interop.postfix import PostfixOperator

pytestmark = pytest.mark.slow

P_DOMAIN = "p.mssante.localhost"
P_ADDRESS = "127.0.0.5"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TrustSpace, PostfixOperator]]:
    space = TrustSpace(tmp_path_factory.mktemp("interop-postfix"), ["a"])
    postfix: PostfixOperator | None = None
    try:
        space.extra_zone.mx.append((P_DOMAIN, f"mx.{P_DOMAIN}", 10))
        space.extra_zone.hosts.append((f"mx.{P_DOMAIN}", P_ADDRESS))
        space.start_dns()
        space.init_all()
        a = space["a"]
        a.trust_domain(P_DOMAIN, "Postfix operator")
        a.gw.cli("certs", "issue", "server", "--name", "postfix-p", "--dns", f"mx.{P_DOMAIN}", "--ip", P_ADDRESS,
                 check=True)
        a.start()
        issued = a.pki_dir / "issued"
        postfix = PostfixOperator(P_DOMAIN, P_ADDRESS, space.relay_port, free_ports(1)[0],
                                  cert_chain=issued / "postfix-p.chain.pem", key=issued / "postfix-p.key",
                                  ca_file=a.pki_dir / "ca" / "chain.pem", routes={a.domain: (a.address, a.mx)})
        postfix.configure()
        postfix.start()
        yield space, postfix
    finally:
        if postfix is not None:
            postfix.stop()
        space.stop()


def test_gateway_delivers_to_postfix(world: tuple[TrustSpace, PostfixOperator]) -> None:
    space, postfix = world
    a = space["a"]
    claire = a.clinician(0)
    a.submit(claire, [f"dr.paul@{P_DOMAIN}"], "Gateway vers Postfix")

    raw = wait_for(lambda: next((m for m in postfix.delivered("dr.paul") if b"Gateway vers Postfix" in m), None),
                   "Postfix to deliver into dr.paul's maildir")
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["From"] == claire["address"]
    received = str(message["Received"])                      # Postfix's: the certificate A presented, verified
    assert f"by mx.{P_DOMAIN} (Postfix)" in received, received
    assert 'Client CN "mx.a.mssante.localhost"' in received and "(verified OK)" in received, received
    assert "TLSv1.3" in received or "TLSv1.2" in received
    assert message["X-MSS-NIL"]

    queued = a.queue()                                        # and A knows it was delivered, over verified TLS
    assert not [entry for entry in queued if any(r["state"] != "delivered" for r in a.queue_show(entry["id"])["recipients"])]
    assert "Trusted TLS connection established from" in postfix.log_text()   # smtpd: client certificate verified


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks is not installed")
def test_postfix_relays_to_gateway(world: tuple[TrustSpace, PostfixOperator]) -> None:
    space, postfix = world
    a = space["a"]
    claire = a.clinician(0)
    result = subprocess.run(
        ["swaks", "--server", f"{P_ADDRESS}:{postfix.submission_port}", "--ehlo", "poste.p.mssante.localhost",
         "--from", f"dr.paul@{P_DOMAIN}", "--to", claire["address"],
         "--header", "Subject: Postfix vers Gateway", "--body", "Compte rendu du Dr Paul.\n"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout, result.stdout

    message = a.wait_for_message(claire, "Postfix vers Gateway", timeout=90)
    assert message["From"] == f"dr.paul@{P_DOMAIN}"
    received = str(message["Received"])
    assert f"from mx.{P_DOMAIN}" in received and "by mx.a.mssante.localhost" in received, received
    assert f"client certificate mx.{P_DOMAIN} verified" in received, received
    results = " ".join(str(h) for h in message.get_all("Authentication-Results", []))
    assert "x-tls=pass" in results and f"smtp.remote-cert=mx.{P_DOMAIN}" in results, results
    log = postfix.log_text()
    # smtp client, level "secure": the gateway's certificate chains to the CA file and names mx.a (the match=).
    assert f"Verified TLS connection established to {a.address}[{a.address}]:{space.relay_port}" in log, log[-3000:]
