"""Folder names a client may create or rename to, through a running ``gateway serve`` (RFC 3501 5.1, 6.3.3,
6.3.5).

A name is a path of levels separated by "/". The gateway refuses with ``NO [CANNOT]`` and a reason every name
a file-based store or an export could read as a path of its own: a "." or ".." level, a first level starting
with "~" (a home directory), a leading separator, an empty level ("a//b", "a//"), as Dovecot does
(mailbox_list_is_valid_fs_name); and a first level that is INBOX in another spelling than ASCII case (RFC 3501
5.1: INBOX is case-insensitive, so "inbox" *is* INBOX and CREATE answers ALREADYEXISTS, but "ınbox" with a
dotless i or a full-width "ＩＮＢＯＸ" are neither INBOX nor a name anyone should be shown beside it). One
trailing separator only announces children (RFC 3501 6.3.3). A CREATE reaching out of the mailbox ("../x") is
also a door refusal in the audit log.
"""

from __future__ import annotations

import imaplib
import json
import re
from collections.abc import Iterator

import pytest

from gateway.imap.protocol.mailbox_name import encode_modified_utf7
from tests.harness import GatewayProcess

REFUSED = (                                   # (name as the client means it, what the reason must say)
    ("..", "'..'"),
    (".", "'.'"),
    ("a/..", "'..'"),
    ("a/../b", "'..'"),
    ("a/./b", "'.'"),
    ("../x", "'..'"),
    ("~x", "'~'"),
    ("~", "'~'"),
    ("~/Mail", "'~'"),
    ("/a", "begins with"),
    ("//a", "begins with"),
    ("a//b", "empty level"),
    ("a//", "empty level"),
    ("ınbox", "INBOX"),                       # dotless i: "ınbox".upper() == "INBOX"
    ("ＩＮＢＯＸ", "INBOX"),                   # full-width
    ("ınbox/Sub", "INBOX"),
)
ALLOWED = ("x~y", "a/~b", ".hidden", "b.", "a..b", "Patients/2024")


@pytest.fixture(scope="module")
def imap(shared_gateway: GatewayProcess) -> Iterator[imaplib.IMAP4_SSL]:
    client = shared_gateway.imaps_login("PER", 0)
    yield client
    client.logout()


def quoted(name: str) -> str:
    return '"' + encode_modified_utf7(name) + '"'


def tagged(client: imaplib.IMAP4_SSL, command: str, *args: str) -> tuple[str, str]:
    """The tagged reply's status and text, the response code included (imaplib keeps it in the text)."""
    try:
        typ, data = client._simple_command(command, *args)
    except imaplib.IMAP4.error as error:       # BAD
        return "BAD", str(error)
    text = b" ".join(part for part in data if isinstance(part, bytes)).decode()
    code = [key for key in ("CANNOT", "ALREADYEXISTS", "NONEXISTENT", "TRYCREATE") if key in client.untagged_responses]
    for key in code:
        client.untagged_responses.pop(key)
    return typ, (f"[{code[0]}] " if code else "") + text


def listed(client: imaplib.IMAP4_SSL) -> set[str]:
    typ, data = client.list('""', "*")
    assert typ == "OK", data
    names = set()
    for line in data:
        assert isinstance(line, bytes)
        match = re.fullmatch(rb'\(.*?\) "/" (.*)', line)
        assert match, line
        names.add(match.group(1).decode().strip('"'))
    return names


@pytest.mark.parametrize(("name", "reason"), REFUSED)
def test_create_refuses_names_a_file_store_would_read_as_paths(imap: imaplib.IMAP4_SSL, name: str,
                                                               reason: str) -> None:
    typ, text = tagged(imap, "CREATE", quoted(name))
    assert typ == "NO" and text.startswith("[CANNOT] "), (name, typ, text)
    assert reason in text, (name, text)
    assert encode_modified_utf7(name) not in listed(imap)
    assert not any(level in (".", "..") or level.startswith("~") for folder in listed(imap)
                   for level in folder.split("/")), listed(imap)
    imap.noop()                               # still served


@pytest.mark.parametrize(("name", "reason"), REFUSED)
def test_rename_refuses_them_too(imap: imaplib.IMAP4_SSL, name: str, reason: str) -> None:
    source = "Renommable"
    tagged(imap, "CREATE", source)
    typ, text = tagged(imap, "RENAME", source, quoted(name))
    assert typ == "NO" and text.startswith("[CANNOT] ") and reason in text, (name, typ, text)
    assert source in listed(imap)


@pytest.mark.parametrize("name", ALLOWED)
def test_ordinary_names_with_dots_and_tildes_inside_are_created(imap: imaplib.IMAP4_SSL, name: str) -> None:
    typ, text = tagged(imap, "CREATE", quoted(name))
    assert typ == "OK", (name, text)
    assert name in listed(imap)


@pytest.mark.parametrize("spelling", ["inbox", "Inbox", "INBOX", "iNbOx/"])
def test_inbox_in_any_ascii_case_is_inbox(imap: imaplib.IMAP4_SSL, spelling: str) -> None:
    """RFC 3501 6.3.3: "It is an error to attempt to create INBOX"; 5.1: in any case."""
    typ, text = tagged(imap, "CREATE", quoted(spelling))
    assert typ == "NO" and text.startswith("[ALREADYEXISTS] "), (spelling, text)
    assert not {name for name in listed(imap) if name.upper() == "INBOX" and name != "INBOX"}


def test_inbox_children_take_inbox_s_spelling(imap: imaplib.IMAP4_SSL) -> None:
    typ, text = tagged(imap, "CREATE", quoted("inbox/Courrier"))
    assert typ == "OK", text
    assert "INBOX/Courrier" in listed(imap) and "inbox/Courrier" not in listed(imap)


def test_one_trailing_separator_announces_children(imap: imaplib.IMAP4_SSL) -> None:
    """RFC 3501 6.3.3: "owatagusiam/" creates "owatagusiam"."""
    typ, text = tagged(imap, "CREATE", quoted("Annonce/"))
    assert typ == "OK", text
    assert "Annonce" in listed(imap) and "Annonce/" not in listed(imap)


def test_a_create_reaching_out_of_the_mailbox_is_a_door_refusal(shared_gateway: GatewayProcess,
                                                                 imap: imaplib.IMAP4_SSL) -> None:
    typ, text = tagged(imap, "CREATE", quoted("../../voisin@demo.mssante.localhost/INBOX"))
    assert typ == "NO" and text.startswith("[CANNOT] "), text
    listed_entries = shared_gateway.cli("audit", "list", "--event", "door_refused", "--json", "--limit", "1000",
                                        check=True)
    reasons = [entry for entry in json.loads(listed_entries.stdout) if entry["source"]["door"] == "imap"]
    assert any("traversal" in json.dumps(entry) for entry in reasons), reasons
