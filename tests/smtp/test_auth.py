"""AUTH with real clients: smtplib and aiosmtplib, PLAIN and LOGIN, STARTTLS and implicit TLS;
the lockout after repeated failures and the per-account session limit (said as a limit)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable

import aiosmtplib
import pytest

from tests.smtp.conftest import client_context, message
from tests.smtp.gateway_thread import GatewayThread


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_login_starttls(gw: GatewayThread, mechanism: str) -> None:
    doctor = gw.account("PER")
    with smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30) as client:
        client.starttls(context=client_context(gw.ca_file))
        client.ehlo()
        client.user, client.password = doctor.address, doctor.password
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        assert client.sendmail(doctor.address, [gw.account("PER", 1).address], message(doctor.address, "marc")) == {}


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_bad_password(gw: GatewayThread, mechanism: str) -> None:
    doctor = gw.account("PER")
    with smtplib.SMTP("127.0.0.1", gw.ports["submission"], timeout=30) as client:
        client.starttls(context=client_context(gw.ca_file))
        client.ehlo()
        client.user, client.password = doctor.address, "wrong password"
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    assert (failed.value.smtp_code, failed.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")


def test_smtplib_implicit_tls(gw: GatewayThread) -> None:
    nurse = gw.account("PER", 2)
    with smtplib.SMTP_SSL("127.0.0.1", gw.ports["submissions"], context=client_context(gw.ca_file), timeout=30) as client:
        assert "starttls" not in client.ehlo_resp.decode().lower() if client.ehlo_resp else True
        client.login(nurse.address, nurse.password)
        assert client.sendmail(nurse.address, [gw.account("PER").address], message(nurse.address, "claire")) == {}


@pytest.mark.parametrize("port_kind, tls", [("submission", "starttls"), ("submissions", "implicit")])
async def test_aiosmtplib(gw: GatewayThread, port_kind: str, tls: str) -> None:
    doctor = gw.account("PER")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.ports[port_kind], tls_context=client_context(gw.ca_file),
                             use_tls=tls == "implicit", start_tls=tls == "starttls", timeout=30)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failed:
        await client.login(doctor.address, "nope")
    assert failed.value.code == 535
    await client.login(doctor.address, doctor.password)
    errors, reply = await client.sendmail(doctor.address, [gw.account("PER", 1).address], message(doctor.address, "x"))
    assert errors == {} and reply.startswith("2.0.0 OK queued as ")
    await client.quit()


def test_lockout_after_repeated_failures(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = GatewayThread(tmp_path_factory.mktemp("lockout") / "data", overrides={
        "auth": {"failures_before_delay": 3, "first_delay_seconds": 120},
        "smtp": {"auth_failures_per_connection": 5}}).start()
    try:
        doctor = gateway.account("PER")
        with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], context=client_context(gateway.ca_file)) as client:
            client.ehlo()
            for _ in range(3):
                with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                    _auth_plain(client, doctor.address, "wrong")
                assert failed.value.smtp_code == 535
            # From this address, this login must wait now: even the right password gets a temporary refusal
            # naming the delay (other addresses are not held back: tests/security/test_auth_doors.py).
            with pytest.raises(smtplib.SMTPAuthenticationError) as locked:
                _auth_plain(client, doctor.address, doctor.password)
        assert locked.value.smtp_code == 454
        assert locked.value.smtp_error.startswith(b"4.7.0 Too many failed authentication attempts; try again in")
    finally:
        gateway.stop()


def test_connection_closed_after_failures_on_one_connection(gw: GatewayThread) -> None:
    patient = gw.account("PAT", 0)
    client = smtplib.SMTP_SSL("127.0.0.1", gw.ports["submissions"], context=client_context(gw.ca_file))
    client.ehlo()
    for _ in range(2):
        with pytest.raises(smtplib.SMTPAuthenticationError):
            _auth_plain(client, patient.address, "wrong")
    with pytest.raises(smtplib.SMTPAuthenticationError) as last:
        _auth_plain(client, patient.address, "wrong")
    assert last.value.smtp_code == 535
    code, text = client.getreply()          # then the server says why it closes
    assert (code, text) == (421, b"4.7.0 Too many failed authentication attempts, closing connection")
    client.close()


def test_session_limit_is_said_as_a_limit(tmp_path_factory: pytest.TempPathFactory) -> None:
    gateway = GatewayThread(tmp_path_factory.mktemp("sessions") / "data", overrides={"smtp": {"max_sessions_per_user": 2}}).start()
    try:
        doctor = gateway.account("PER")
        context = client_context(gateway.ca_file)
        first = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], context=context)
        second = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], context=context)
        first.login(doctor.address, doctor.password)
        second.login(doctor.address, doctor.password)
        third = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], context=context)
        third.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            _auth_plain(third, doctor.address, doctor.password)
        assert refused.value.smtp_code == 421
        assert b"Too many simultaneous sessions" in refused.value.smtp_error
        assert b"your password is fine" in refused.value.smtp_error
        first.quit()
        # The slot is given back when a session ends: a new login works again.
        fourth = smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"], context=context)
        _wait_until(lambda: _login_ok(fourth, doctor.address, doctor.password))
        second.quit()
        fourth.quit()
    finally:
        gateway.stop()


def _auth_plain(client: smtplib.SMTP, login: str, password: str) -> None:
    """One AUTH PLAIN exchange (smtplib's login() would try the next mechanism after a failure)."""
    client.user, client.password = login, password
    client.auth("PLAIN", client.auth_plain)


def _login_ok(client: smtplib.SMTP, login: str, password: str) -> bool:
    try:
        client.login(login, password)
        return True
    except smtplib.SMTPAuthenticationError:
        return False


def _wait_until(condition: Callable[[], bool], attempts: int = 50) -> None:
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition never became true")


def test_limiter_counts_return_to_zero(gw: GatewayThread) -> None:
    """Every path gives its slots back (maddy#348): after clean, failed and aborted sessions."""
    doctor = gw.account("PER")
    context = client_context(gw.ca_file)
    with smtplib.SMTP_SSL("127.0.0.1", gw.ports["submissions"], context=context) as ok:
        ok.login(doctor.address, doctor.password)
    bad = smtplib.SMTP_SSL("127.0.0.1", gw.ports["submissions"], context=context)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        bad.login(doctor.address, "wrong")
    bad.close()                                               # dropped without QUIT
    aborted = smtplib.SMTP("127.0.0.1", gw.ports["submission"])
    aborted.close()                                           # vanished mid-session, before TLS

    _wait_until(lambda: _open_slots(gw) == ({}, {}))


def _open_slots(gw: GatewayThread) -> tuple[dict[str, int], dict[str, int]]:
    assert gw.listeners is not None
    limits = gw.listeners.session_limits
    return limits.connections_per_ip.snapshot(), limits.sessions_per_user.snapshot()

