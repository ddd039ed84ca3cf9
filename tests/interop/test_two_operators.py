"""Two operators of the trust space exchange mail; a third, whose CA nobody trusts, is refused.

    operator A  a.mssante.localhost  mx.a.mssante.localhost  127.0.0.2
    operator B  b.mssante.localhost  mx.b.mssante.localhost  127.0.0.3
    operator C  c.mssante.localhost  mx.c.mssante.localhost  127.0.0.4   (its CA is trusted by nobody)

A and B trust each other's CA and domain. C trusts A (CA and domain), and A lists C's
domain on its trust list, so the one thing that stops C is A's verification of C's
client certificate: the rule under test, isolated.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from tests.interop.operators import TrustSpace, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrustSpace]:
    space = TrustSpace(tmp_path_factory.mktemp("interop"), ["a", "b", "c"])
    try:
        space.start_dns()
        space.init_all()
        a, b, c = space["a"], space["b"], space["c"]
        a.trust_ca_of(b)
        b.trust_ca_of(a)
        c.trust_ca_of(a)
        a.trust_domain(b.domain, "Operator B")
        a.trust_domain(c.domain, "Operator C")       # the domain is listed: only the certificate is wrong
        b.trust_domain(a.domain, "Operator A")
        c.trust_domain(a.domain, "Operator A")
        for op in (a, b, c):
            op.start()
        yield space
    finally:
        space.stop()


def _check_trace(message: EmailMessage, receiver: str, sender_mx: str) -> None:
    received = str(message["Received"])                      # the topmost: added by the receiving operator
    assert f"by {receiver}" in received and "ESMTPS" in received, received
    assert f"client certificate {sender_mx} verified" in received, received
    results = [str(h) for h in message.get_all("Authentication-Results", [])]
    ours = [r for r in results if r.startswith(receiver)]
    assert ours, results
    assert "x-tls=pass" in ours[0] and f"smtp.remote-cert={sender_mx}" in ours[0], ours[0]


def test_a_clinician_writes_to_b_and_b_answers(space: TrustSpace) -> None:
    a, b = space["a"], space["b"]
    claire, bob = a.clinician(0), b.clinician(1)

    a.submit(claire, [bob["address"]], "A vers B : compte rendu")
    arrived = b.wait_for_message(bob, "A vers B : compte rendu")
    assert arrived["From"] == claire["address"]
    _check_trace(arrived, b.mx, a.mx)
    assert arrived["X-MSS-NIL"]                                # added by A for what its users send, kept by B

    b.submit(bob, [claire["address"]], "Re: A vers B : compte rendu")
    answer = a.wait_for_message(claire, "Re: A vers B : compte rendu")
    assert answer["From"] == bob["address"]
    _check_trace(answer, a.mx, b.mx)

    for op in (a, b):                                          # nothing left behind in either queue
        wait_for(lambda: not op.queue(state="deferred") and not op.queue(state="pending"),
                 f"operator {op.name}'s queue to drain")


def test_a_does_not_accept_c_whose_certificate_it_does_not_trust(space: TrustSpace) -> None:
    a, c = space["a"], space["c"]
    charles, claire = c.clinician(0), a.clinician(0)

    c.submit(charles, [claire["address"]], "C vers A : refusé")

    def deferred_recipient() -> dict[str, Any] | None:
        for entry in c.queue(state="deferred"):
            for recipient in c.queue_show(entry["id"])["recipients"]:
                if recipient["address"] == claire["address"] and recipient["state"] == "deferred":
                    return recipient
        return None

    recipient = wait_for(deferred_recipient, "C's message to A to be deferred")
    assert "mx.a.mssante.localhost" in recipient["last_error"]
    assert "did not accept our client certificate" in recipient["last_error"], recipient
    assert recipient["history"][-1]["enhanced"] == "4.7.5"       # RFC 3463 X.7.5: cryptographic failure
    assert not [m for m in a.imap_messages(claire) if m["Subject"] == "C vers A : refusé"]
