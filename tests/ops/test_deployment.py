"""deploy/: the systemd unit, its sysusers.d / tmpfiles.d snippets and the example configuration agree with each
other and with the gateway, systemd itself accepts the unit, and ``gateway serve`` works under the confinement the
unit asks for (NoNewPrivileges, MemoryDenyWriteExecute, SystemCallFilter, RestrictAddressFamilies), applied here by the kernel without
systemd (tests/ops/confined_exec.py): mail submitted over SMTP is read back over IMAP, HTTPS answers, SIGHUP and
SIGTERM behave."""

from __future__ import annotations

import errno
import imaplib
import re
import shlex
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.config import Settings, load_settings
from tests.harness import GATEWAY, REPO, GatewayProcess, read_inbox, run_cli, wait_until

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "gateway.service"
EXAMPLE_CONFIG = DEPLOY / "gateway.toml.example"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def unit_settings(section: str = "Service") -> dict[str, list[str]]:
    """``Key=value`` lines of one section of the unit; a key set several times keeps every value in order."""
    values: dict[str, list[str]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def one(key: str) -> str:
    (value,) = unit_settings()[key]
    return value


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, f"a systemd time span this test reads: {value}"
    return float(match.group(1)) * (60 if match.group(2) in ("min", "m") else 1)


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's ``gateway`` script (the unit names /opt/gateway)."""
    here = Path(sys.executable).parent / "gateway"
    assert here.exists(), f"the gateway console script is not installed beside {sys.executable}"
    copy = tmp_path / "gateway.service"
    copy.write_text(UNIT.read_text().replace("/opt/gateway/venv/bin/gateway", str(here)))
    return copy


@needs_systemd_analyze
def test_systemd_verifies_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(runnable_unit(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@needs_systemd_analyze
def test_security_exposure_stays_low(tmp_path: Path) -> None:
    """systemd's own scoring of the sandbox (0 = fully confined, 10 = none): a relaxed option shows here."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(runnable_unit(tmp_path))],
                            capture_output=True, text=True)
    match = re.search(r"Overall exposure level for gateway\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_execstart_runs_a_real_command_with_the_example_config() -> None:
    binary, *arguments = shlex.split(one("ExecStart"))
    assert binary.endswith("/bin/gateway") and arguments[:2] == ["--config", "/etc/gateway/gateway.toml"]
    assert arguments[2:] == ["serve"]
    listed = run_cli("--help", check=True).stdout
    assert re.search(r"^\s+serve\s", listed, re.MULTILINE), listed
    assert run_cli("--config", str(EXAMPLE_CONFIG), "serve", "--help", check=True).returncode == 0
    checked = run_cli("--config", str(EXAMPLE_CONFIG), "config", "check", check=True).stdout
    assert "configuration is valid" in checked
    assert shlex.split(one("ExecReload"))[1:] == ["-HUP", "$MAINPID"]   # SIGHUP: gateway/app.py _reload_trust


def test_stop_timeout_is_above_the_shutdown_grace() -> None:
    example = load_settings(EXAMPLE_CONFIG, environ={})
    grace = max(Settings().listen.shutdown_grace_seconds, example.listen.shutdown_grace_seconds)
    assert seconds(one("TimeoutStopSec")) > grace
    assert one("KillSignal") == "SIGTERM" and one("KillMode") in ("mixed", "control-group")


def test_user_data_directory_and_writable_paths_agree() -> None:
    example = load_settings(EXAMPLE_CONFIG, environ={})
    assert unit_settings()["ReadWritePaths"] == [str(example.data_path)]
    assert one("ProtectSystem") == "strict"
    user = one("User")
    sysusers = [line.split() for line in (DEPLOY / "systemd" / "gateway.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert [(fields[0], fields[1]) for fields in sysusers] == [("u", user)]
    tmpfiles = {fields[1]: fields for fields in (line.split() for line in
                (DEPLOY / "systemd" / "gateway.tmpfiles").read_text().splitlines() if line and not line.startswith("#"))}
    assert tmpfiles[str(example.data_path)][:5] == ["d", str(example.data_path), "0700", user, user]
    assert one("UMask") == "0077"


def test_privileged_ports_need_only_net_bind_service() -> None:
    example = load_settings(EXAMPLE_CONFIG, environ={})
    ports = [example.listen.smtp_relay_port, example.listen.smtp_submission_port, example.listen.smtp_submissions_port,
             example.listen.imap_port, example.listen.imaps_port, example.listen.http_port]
    assert any(port < 1024 for port in ports)
    assert one("CapabilityBoundingSet") == one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("NoNewPrivileges") == "yes"
    assert int(one("LimitNOFILE")) >= 16384


# --- the unit's confinement, applied by the kernel, around a real `gateway serve` ---------------------------------

def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: every @group and its members (names and nested @groups)."""
    assert SYSTEMD_ANALYZE is not None
    listing = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter", "--no-pager"], capture_output=True, text=True,
                             check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    calls: set[str] = set()
    for name in names:
        calls |= expand(groups[name], groups) if name.startswith("@") else {name}
    return calls


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines as systemd applies them: allow lists add, ``~`` lists take away."""
    groups = syscall_groups()
    allowed = expand(["@default"], groups)
    for line in unit_settings()["SystemCallFilter"]:
        if line.startswith("~"):
            allowed -= expand(line[1:].split(), groups)
        else:
            allowed |= expand(line.split(), groups)
    return allowed


def confined(allowed: Path, *command: str) -> list[str]:
    return [sys.executable, str(REPO / "tests" / "ops" / "confined_exec.py"), str(allowed), "--", *command]


@needs_systemd_analyze
def test_the_confinement_is_real(tmp_path: Path) -> None:
    """The launcher does confine: W+X memory, a @privileged call (chroot) and a netlink or packet socket are
    refused, as systemd would refuse them."""
    allowed = tmp_path / "allowed"
    allowed.write_text("\n".join(sorted(allowed_syscalls())))
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = subprocess.run(confined(allowed, sys.executable, "-c", wx), capture_output=True, text=True)
    assert result.returncode != 0 and "Permission denied" in result.stderr, result.stderr
    privileged = "import os\ntry:\n    os.chroot('/')\nexcept PermissionError:\n    print('EPERM')"
    result = subprocess.run(confined(allowed, sys.executable, "-c", privileged), capture_output=True, text=True)
    assert result.stdout.strip() == "EPERM", result.stdout + result.stderr
    families = ("import socket\nfor family in (socket.AF_NETLINK, socket.AF_PACKET, socket.AF_INET6):\n"
                "    try:\n        socket.socket(family, socket.SOCK_RAW if family != socket.AF_INET6 else "
                "socket.SOCK_STREAM).close()\n        print('allowed')\n"
                "    except OSError as error:\n        print(error.errno)")
    result = subprocess.run(confined(allowed, sys.executable, "-c", families), capture_output=True, text=True)
    assert result.stdout.split() == [str(errno.EAFNOSUPPORT), str(errno.EAFNOSUPPORT), "allowed"], result.stderr
    status = subprocess.run(confined(allowed, "cat", "/proc/self/status"), capture_output=True, text=True).stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE) and re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)


@needs_systemd_analyze
def test_serve_works_under_the_units_confinement(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.write_text("\n".join(sorted(allowed_syscalls())))
    gateway = GatewayProcess(tmp_path / "gw")
    gateway.init_demo()
    ready = gateway.data_dir / "run" / "ready.json"
    with open(gateway.data_dir / "serve.log", "ab") as log:
        gateway.process = subprocess.Popen(confined(allowed, *GATEWAY, "--data-dir", str(gateway.data_dir), "serve"),
                                           env=gateway.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_until(lambda: True if ready.exists() or gateway.process.poll() is not None else None,  # type: ignore[union-attr]
                   timeout=120, what="confined gateway serve ready")
        assert gateway.process.poll() is None, gateway.log_text()
        status = Path(f"/proc/{gateway.process.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), "the server itself runs under the filter"

        sender, recipient = gateway.account("PER", 0), gateway.account("PER", 1)
        context = ssl.create_default_context(cafile=gateway.ca_file)
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = sender["address"], recipient["address"], "confined"
        message.set_content("Sent to a gateway under NoNewPrivileges, MemoryDenyWriteExecute and a syscall filter.")
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp_submission_port"], timeout=60) as smtp:
            smtp.starttls(context=context)
            smtp.login(sender["address"], sender["password"])   # argon2id (cffi) in a worker thread
            smtp.send_message(message)

        def delivered() -> bool | None:
            with imaplib.IMAP4_SSL("127.0.0.1", gateway.ports["imaps_port"], ssl_context=context, timeout=60) as imap:
                return True if any(m["Subject"] == "confined" for m in read_inbox(imap, recipient)) else None
        wait_until(delivered, timeout=60, what="the message read back over IMAPS", interval=0.5)

        with urllib.request.urlopen(f"https://127.0.0.1:{gateway.ports['http_port']}/", context=context,
                                    timeout=60) as page:
            assert page.status == 200

        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: True if "SIGHUP: reloaded" in gateway.log_text() else None, timeout=30, what="reload")
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(60) == 0, gateway.log_text()
        assert "Operation not permitted" not in gateway.log_text()
    finally:
        gateway.stop(signal.SIGKILL)
