"""The filing's CPU work (parse once, extract) gives the same answer in a thread and in a process of its own,
and a dead extraction process costs a retry in a thread, not the filing."""

from __future__ import annotations

import os
import signal
from email.message import EmailMessage

import pytest

from gateway.dmp_bridge.examine import Examiner, examine_message
from gateway.dmp_bridge.extract import FILING_POLICY
from tests.dmp_bridge.filing_world import SAMPLES, message_with, sample

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")


def _raw() -> bytes:
    return message_with(("CR.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"), to="patient@patient.localhost",
                        subject="CR").as_bytes()


def _summary(message: EmailMessage, source: EmailMessage, documents: object) -> tuple[object, ...]:
    return (message.as_bytes(), source is message, documents)


async def test_a_process_of_its_own_gives_the_thread_s_answer() -> None:
    raw = _raw()
    in_thread = await Examiner(0).examine(raw, None, True)
    examiner = Examiner(1)
    try:
        await examiner.start()
        in_process = await examiner.examine(raw, None, True)
    finally:
        examiner.close()
    assert _summary(*in_process[:2], in_process[2].documents) == _summary(*in_thread[:2], in_thread[2].documents)
    document = in_process[2].documents[0]
    assert document.source == "cda" and document.cda is not None and document.content == sample("VAC-NOTE_2023.01.xml")
    # the parsed message reads its headers with this process's filing policy (its registry is not copied)
    assert in_process[0].policy.header_factory is FILING_POLICY.header_factory  # type: ignore[attr-defined]
    assert in_process[0]["Subject"] == "CR"


async def test_the_decrypted_content_is_the_source_and_nothing_is_extracted_unless_asked() -> None:
    raw, inner = _raw(), message_with(("inner.xml", sample("VAC-NOTE_2023.01.xml"), "text/xml"),
                                      to="patient@patient.localhost", subject="inner").as_bytes()
    message, source, extraction = examine_message(raw, inner, True)
    assert message["Subject"] == "CR" and source["Subject"] == "inner"
    assert [d.attachment for d in extraction.documents] == ["inner.xml"]
    assert examine_message(raw, None, False)[2].documents == ()


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
        message, _source, extraction = await examiner.examine(_raw(), None, True)
        assert message["Subject"] == "CR" and len(extraction.documents) == 1
        assert examiner._pool is not pool  # the next message goes to a new process
        again = await examiner.examine(_raw(), None, True)
        assert len(again[2].documents) == 1
    finally:
        examiner.close()
