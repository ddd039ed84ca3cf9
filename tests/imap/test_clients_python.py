"""Real Python IMAP clients against the server: imapclient (blocking) and aioimaplib (asyncio)."""

from __future__ import annotations

import asyncio
import threading

import aioimaplib  # type: ignore[import-untyped]
import imapclient  # type: ignore[import-untyped]
from imapclient import imapclient as imapclient_module

from tests.imap.imap_server import HOST, RunningImap, imap, make_message  # noqa: F401 (fixture)


def _imapclient(imap: RunningImap, *, starttls: bool = False) -> imapclient.IMAPClient:  # noqa: F811
    if starttls:
        client = imapclient.IMAPClient(HOST, port=imap.starttls_port, ssl=False, timeout=30)
        client.starttls(imap.client_context())
        return client
    return imapclient.IMAPClient(HOST, port=imap.imaps_port, ssl=True, ssl_context=imap.client_context(), timeout=30)


def test_imapclient_everyday_session(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("Compte rendu"))
    client = _imapclient(imap, starttls=True)
    client.login(account.address, account.password)
    assert client.find_special_folder(imapclient_module.SENT) == "Sent"       # RFC 6154 via LIST
    assert client.find_special_folder(imapclient_module.TRASH) == "Trash"
    names = [name for _, _, name in client.list_folders()]
    assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= set(names)
    info = client.select_folder("INBOX")
    assert info[b"EXISTS"] == 1 and b"UIDVALIDITY" in info and b"HIGHESTMODSEQ" in info
    uid = client.search(["SUBJECT", "compte"])[0]
    data = client.fetch([uid], ["FLAGS", "ENVELOPE", "BODYSTRUCTURE", "RFC822.SIZE", "INTERNALDATE",
                                "BODY.PEEK[]", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])[uid]
    assert data[b"ENVELOPE"].subject == b"Compte rendu"
    assert data[b"ENVELOPE"].from_[0].mailbox == b"house"
    assert data[b"RFC822.SIZE"] == len(data[b"BODY[]"])
    assert data[b"BODY[HEADER.FIELDS (SUBJECT)]"] == b"Subject: Compte rendu\r\n\r\n"
    assert data[b"BODYSTRUCTURE"].is_multipart is False
    assert b"\\Seen" not in data[b"FLAGS"]
    client.add_flags([uid], [imapclient.SEEN, b"$Label1"])
    assert set(client.get_flags([uid])[uid]) >= {b"\\Seen", b"$Label1"}
    client.copy([uid], "Archive")
    assert client.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
    client.move([uid], "Trash")
    assert client.search("ALL") == []
    client.select_folder("Trash")
    appended = client.append("Drafts", make_message("brouillon"), flags=[imapclient.DRAFT])
    assert b"APPENDUID" in appended
    assert client.folder_status("Drafts", ["MESSAGES"])[b"MESSAGES"] == 1
    client.delete_messages(client.search("ALL"))
    client.expunge()
    assert client.search("ALL") == []
    assert client.namespace().personal == (("", "/"),)
    client.logout()


def test_imapclient_idle_sees_a_delivery(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    client = _imapclient(imap)
    client.login(account.address, account.password)
    client.select_folder("INBOX")
    client.idle()
    threading.Timer(0.2, imap.deliver, args=(account.address, make_message("pendant IDLE"))).start()
    responses = client.idle_check(timeout=20)
    client.idle_done()
    assert (1, b"EXISTS") in responses
    client.logout()


def test_imapclient_condstore_and_uid_first(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("un"))
    client = _imapclient(imap)
    client.login(account.address, account.password)
    client.enable("CONDSTORE")
    info = client.select_folder("INBOX")
    modseq = info[b"HIGHESTMODSEQ"]
    client.add_flags([1], [imapclient.FLAGGED], silent=True)
    changed = client.fetch([1], ["FLAGS"], modifiers=[f"CHANGEDSINCE {modseq}"])
    assert list(changed) == [1] and changed[1][b"MODSEQ"][0] > modseq
    client.logout()


def test_aioimaplib_session_with_idle(imap: RunningImap) -> None:  # noqa: F811
    account = imap.new_account()
    imap.deliver(account.address, make_message("avant"))

    async def scenario() -> None:
        client = aioimaplib.IMAP4_SSL(host=HOST, port=imap.imaps_port, ssl_context=imap.client_context(), timeout=30)
        await client.wait_hello_from_server()
        assert (await client.login(account.address, account.password)).result == "OK"
        assert (await client.select("INBOX")).result == "OK"
        fetched = await client.fetch("1", "(UID FLAGS BODY.PEEK[HEADER])")
        assert fetched.result == "OK" and b"Subject: avant" in b"".join(
            line for line in fetched.lines if isinstance(line, (bytes, bytearray)))
        idle = await client.idle_start(timeout=20)
        await asyncio.get_running_loop().run_in_executor(
            None, imap.deliver, account.address, make_message("pendant"))
        pushed = await client.wait_server_push(timeout=20)
        client.idle_done()
        await asyncio.wait_for(idle, 20)
        assert any(b"EXISTS" in (line if isinstance(line, bytes) else str(line).encode()) for line in pushed)
        assert (await client.logout()).result == "OK"

    asyncio.run(scenario())
