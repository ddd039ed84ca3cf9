"""Command-line mail clients against the server: curl, mbsync (isync), offlineimap, mutt.

They connect to ``localhost`` and verify the certificate against the test CA,
host name included (mbsync 1.4 only looks at DNS names, which the gateway's
certificate carries).
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.imap.imap_server import RunningImap, imap, make_message  # noqa: F401 (fixture)
from gateway.directory.demo import DemoAccount


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    return path


def _run(command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{command[0]} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _server_view(imap: RunningImap, account: DemoAccount, folder: str) -> dict[str, bytes]:  # noqa: F811
    """Subject -> flags of every message in ``folder``, read with imaplib."""
    client = imap.login(account)
    client.select(folder, readonly=True)
    _, data = client.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    client.logout()
    view: dict[str, bytes] = {}
    for item in data:
        if isinstance(item, tuple):
            subject = item[1].decode().strip().removeprefix("Subject: ")
            view[subject] = item[0]
    return view


# --- curl ---------------------------------------------------------------------------------------

def _curl(imap: RunningImap, account: DemoAccount, url: str, *args: str) -> str:  # noqa: F811
    curl = _require("curl")
    return _run([curl, "-sS", "--cacert", imap.ca_file, "-u", f"{account.address}:{account.password}",
                 *args, url]).stdout


def test_curl_lists_fetches_searches_and_appends(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("pour curl"))
    imaps = f"imaps://localhost:{imap.imaps_port}"
    listing = _curl(imap, account, imaps + "/")
    assert '"/" INBOX' in listing and "\\Sent" in listing
    message = _curl(imap, account, imaps + "/INBOX;UID=1")
    assert "Subject: pour curl" in message
    assert _curl(imap, account, imaps + "/INBOX", "-X", "SEARCH SUBJECT curl").strip() == "* SEARCH 1"
    upload = tmp_path / "draft.eml"
    upload.write_bytes(make_message("depuis curl"))
    _curl(imap, account, imaps + "/Drafts", "-T", str(upload))
    assert "depuis curl" in _server_view(imap, account, "Drafts")


def test_curl_starttls_is_required_and_works(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("en clair puis TLS"))
    message = _curl(imap, account, f"imap://localhost:{imap.starttls_port}/INBOX;UID=1", "--ssl-reqd")
    assert "Subject: en clair puis TLS" in message


# --- mbsync -----------------------------------------------------------------------------------------

def _mbsync_config(imap: RunningImap, account: DemoAccount, mail: Path) -> str:  # noqa: F811
    return f"""IMAPAccount gateway
Host localhost
Port {imap.imaps_port}
User {account.address}
Pass {account.password}
SSLType IMAPS
CertificateFile {imap.ca_file}

IMAPStore gateway-remote
Account gateway

MaildirStore gateway-local
Path {mail}/
Inbox {mail}/INBOX
SubFolders Verbatim

Channel gateway
Far :gateway-remote:
Near :gateway-local:
Patterns *
Create Both
Expunge Both
SyncState *
"""


def _maildir_message(folder: Path, subject: str) -> Path:
    for path in [*folder.glob("cur/*"), *folder.glob("new/*")]:
        if f"Subject: {subject}".encode() in path.read_bytes():
            return path
    raise AssertionError(f"no message {subject!r} in {folder}")


def test_mbsync_two_way_sync(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    mbsync = _require("mbsync")
    account = imap.new_account()
    imap.deliver(account.address, make_message("a lire"))
    imap.deliver(account.address, make_message("a supprimer"))
    mail = tmp_path / "mail"
    mail.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(_mbsync_config(imap, account, mail))
    _run([mbsync, "-c", str(config), "-a"])
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= {p.name for p in mail.iterdir()}
    # Locally: mark one seen, delete the other (maildir flag T), file a new one in Archive.
    read = _maildir_message(mail / "INBOX", "a lire")
    read.rename(read.parent.parent / "cur" / (read.name.split(":2,")[0] + ":2,S"))
    doomed = _maildir_message(mail / "INBOX", "a supprimer")
    doomed.rename(doomed.parent.parent / "cur" / (doomed.name.split(":2,")[0] + ":2,T"))
    (mail / "Archive" / "new" / "1700000000.1.local").write_bytes(make_message("classe localement"))
    _run([mbsync, "-c", str(config), "-a"])
    inbox = _server_view(imap, account, "INBOX")
    assert list(inbox) == ["a lire"] and b"\\Seen" in inbox["a lire"]
    assert "classe localement" in _server_view(imap, account, "Archive")
    # A third run changes nothing (UIDs and UIDVALIDITY are stable): no duplicate, nothing re-created.
    result = _run([mbsync, "-V", "-c", str(config), "-a"])
    assert "creating new" not in result.stdout
    assert len([*(mail / "INBOX").glob("cur/*"), *(mail / "INBOX").glob("new/*")]) == 1
    assert len([*(mail / "Archive").glob("cur/*"), *(mail / "Archive").glob("new/*")]) == 1


# --- offlineimap ------------------------------------------------------------------------------------------

def _offlineimap_config(imap: RunningImap, account: DemoAccount, mail: Path, metadata: Path) -> str:  # noqa: F811
    return f"""[general]
accounts = gateway
metadata = {metadata}

[Account gateway]
localrepository = local
remoterepository = remote

[Repository local]
type = Maildir
localfolders = {mail}

[Repository remote]
type = IMAP
remotehost = localhost
remoteport = {imap.imaps_port}
remoteuser = {account.address}
remotepass = {account.password}
ssl = yes
sslcacertfile = {imap.ca_file}
"""


def test_offlineimap_pulls_every_folder(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    offlineimap = _require("offlineimap")
    account = imap.new_account()
    imap.deliver(account.address, make_message("pour offlineimap"))
    mail = tmp_path / "mail"
    config = tmp_path / "offlineimaprc"
    config.write_text(_offlineimap_config(imap, account, mail, tmp_path / "meta"))
    _run([offlineimap, "-c", str(config), "-o", "-u", "basic"], timeout=180)
    assert "Subject: pour offlineimap".encode() in b"".join(
        path.read_bytes() for path in (mail / "INBOX").glob("*/*"))
    assert (mail / "Sent").is_dir() and (mail / "Trash").is_dir()


# --- mutt ---------------------------------------------------------------------------------------------

def test_mutt_reads_and_moves_in_batch_mode(imap: RunningImap, tmp_path: Path) -> None:  # noqa: F811
    mutt = _require("mutt")
    script = _require("script")
    account = imap.new_account()
    imap.deliver(account.address, make_message("pour mutt"))
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(f"""set imap_user = "{account.address}"
set imap_pass = "{account.password}"
set folder = "imaps://localhost:{imap.imaps_port}/"
set spoolfile = "+INBOX"
set ssl_ca_certificates_file = "{imap.ca_file}"
set certificate_file = "{tmp_path / 'certificates'}"
set ssl_force_tls = yes
set confirmappend = no
set confirmcreate = no
set delete = yes
set move = no
set header_cache = ""
set message_cachedir = ""
set mail_check = 0
set timeout = 5
""")
    keys = "<save-message>=Archive<enter><sync-mailbox><quit>"
    command = f"{mutt} -n -F {muttrc} -e 'push \"{keys}\"'"
    _run([script, "-qec", command, "/dev/null"], env={"TERM": "xterm", "HOME": str(tmp_path)}, timeout=60)
    assert "pour mutt" in _server_view(imap, account, "Archive")
    assert _server_view(imap, account, "INBOX") == {}
