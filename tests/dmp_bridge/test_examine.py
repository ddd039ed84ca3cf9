"""The filing's CPU work (parse once, extract) gives the same answer in a thread and in a process of its own,
and a dead extraction process costs a retry in a thread, not the filing."""

from __future__ import annotations

import os
import signal

import pytest

from gateway.dmp_bridge.examine import Examiner, examine_message, extract_from, parse_headers
from gateway.dmp_bridge.extract import FILING_POLICY
from tests.dmp_bridge.filing_world import SAMPLES, message_with, sample

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


def _raw() -> bytes:
    return message_with(("CR.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"), to="patient@patient.localhost",
                        subject="CR").as_bytes()


async def test_a_process_of_its_own_gives_the_thread_s_answer() -> None:
    raw = _raw()
    message, in_thread = examine_message(raw, None, True)
    examiner = Examiner(1)
    try:
        await examiner.start()
        in_process = await examiner.extract(raw, None, True)
    finally:
        examiner.close()
    assert in_process.documents == in_thread.documents == (await Examiner(0).extract(raw, None, True)).documents
    document = in_process.documents[0]
    assert document.source == "cda" and document.cda is not None and document.content == sample("VAC-NOTE_2023.01.xml")
    # what the server reads of the message beside a process's extraction: the same headers, its own policy
    headers = parse_headers(raw)
    assert headers.items() == message.items() and headers.get_content_type() == message.get_content_type()
    assert headers.policy.header_factory is FILING_POLICY.header_factory  # type: ignore[attr-defined]
    assert headers["Subject"] == "CR" and headers["Message-ID"] == message["Message-ID"]


def test_the_header_parse_stops_at_the_header_section() -> None:
    raw = b"Subject: outer\r\nContent-Type: multipart/report; report-type=x; boundary=b\r\n\r\n" \
          b"--b\r\nSubject: not a header of the message\r\n\r\nbody\r\n--b--\r\n"
    headers = parse_headers(raw)
    assert headers.get_all("Subject") == ["outer"] and headers.get_content_type() == "multipart/report"
    assert isinstance(headers.get_payload(), str)  # the body is not walked


async def test_the_decrypted_content_is_the_source_and_nothing_is_extracted_unless_asked() -> None:
    raw, inner = _raw(), message_with(("inner.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"),
                                      to="patient@patient.localhost", subject="inner").as_bytes()
    message, extraction = examine_message(raw, inner, True)
    assert message["Subject"] == "CR"
    assert [d.attachment for d in extraction.documents] == ["inner.xml"]
    assert extract_from(raw, inner, True).documents == extraction.documents
    assert examine_message(raw, None, False)[1].documents == ()
    idle = Examiner(1)
    assert (await idle.extract(raw, inner, False)).documents == () and idle._pool is None  # no process for nothing


async def test_a_killed_extraction_process_is_replaced_and_the_message_examined_in_a_thread() -> None:
    examiner = Examiner(1)
    try:
        await examiner.start()
        pool = examiner._pool
        assert pool is not None
        for process in list(pool._processes.values()):
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join()
        extraction = await examiner.extract(_raw(), None, True)
        assert len(extraction.documents) == 1
        assert examiner._pool is not pool  # the next message goes to a new process
        again = await examiner.extract(_raw(), None, True)
        assert len(again.documents) == 1
    finally:
        examiner.close()
