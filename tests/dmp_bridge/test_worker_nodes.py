"""Two nodes' filing workers on one database (each its own engine): every job filed once, every requested
acknowledgement sent once, whichever node claims it (the job lease, dmp_bridge/worker.py)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from sqlalchemy import select

from gateway.dmp_bridge.acknowledgement import Acknowledger
from gateway.dmp_bridge.record import RecordStore
from gateway.dmp_bridge.tables import FilingJob
from gateway.dmp_bridge.worker import FilingWorker, WorkerPolicy
from gateway.queue.tables import QueuedMessage, QueuedRecipient
from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import LAB_ADDRESS, SAMPLES, TEST_INS, cda_message
from tests.dmp_bridge.test_worker import Bench, bench  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"sample documents not found in {SAMPLES}")
DOCUMENTS = ["VAC-NOTE_2023.01.xml", "LDL-SES_2022.01.xml", "BIO-CR-BIO_2021.01_Microbiologie_V1.xml",
             "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "CSE-MDE_2023.01.xml"]


async def test_two_nodes_file_each_job_once(bench: Bench) -> None:  # noqa: F811
    for number, name in enumerate(DOCUMENTS):
        await bench.deliver(cda_message(name, mdn_to=LAB_ADDRESS), bench.world.patient_mailbox_id, f"n{number}:1")
    other_db = Database(bench.world.db.url)
    try:
        node_a = bench.worker(claim_chunk=1)
        node_b = FilingWorker(other_db, bench.world.mailstore, bench.world.blobs,
                              acknowledger=Acknowledger(other_db, bench.generated, bench.world.settings),
                              hub=bench.world.hub, policy=WorkerPolicy(claim_chunk=1))
        ran = await asyncio.gather(node_a.run_once(), node_b.run_once(), node_a.run_once(), node_b.run_once())
        assert sum(ran) == len(DOCUMENTS)                              # each job run by exactly one of them
        async with bench.world.db.session() as session:
            states = Counter((await session.scalars(select(FilingJob.state))).all())
            generated = Counter((await session.scalars(       # mail the workers wrote: to whom
                select(QueuedRecipient.address).join(QueuedMessage).where(QueuedMessage.sender == ""))).all())
        assert set(states) <= {"filed", "not-filed"} and sum(states.values()) == len(DOCUMENTS)   # all finished
        assert len(await RecordStore(bench.world.db, bench.world.blobs).list_for_patient(TEST_INS)) == states["filed"]
        # One MDN per job to the laboratory, one notice per filed document to the patient: none twice.
        assert generated[LAB_ADDRESS] == len(DOCUMENTS)
        assert sum(generated.values()) == len(DOCUMENTS) + states["filed"]
    finally:
        await other_db.dispose()
