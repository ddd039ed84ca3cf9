"""The filing job of a delivery, created in the transaction that delivers the message.

The worker (``worker.py``) examines every delivery through a ``filing_jobs`` row.
It still finds deliveries without a job at every pass (a LEFT JOIN: the safety
net for deliveries made before this existed, or by another path); local
delivery adds the job itself, in the mail store transaction that adds the
message and the delivery row, so the job exists exactly when the delivery does.

A copy delivered to a mailbox that is not a patient's never feeds the record
(the worker extracts documents only from a patient's own mailbox, and such a
job ends ``not-filed`` with no outcome, no acknowledgement and no audit entry).
Its job is therefore created already ended, with the fields the worker would
have written (Message-ID, envelope sender, recipient, the subject sealed under
the mailbox's key): a plain professional message costs the worker nothing. A
copy for a patient's mailbox, or one whose header fields were not parsed at
delivery, gets a ``received`` job the worker runs as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.engine import Connection

from gateway.dmp_bridge.record import JOB_SUBJECT_COLUMN, RecordSealer
from gateway.dmp_bridge.tables import FilingJob, JobState
from gateway.mailstore.headers import CachedHeaders
from gateway.security.at_rest import FieldSealer
from gateway.storage.models import utcnow
from gateway.storage.prepared import Prepared

PATIENT_MAILBOX = "PAT"
_INSERT_JOB = Prepared(insert(cast(Table, FilingJob.__table__)))      # on SQLite's driver directly


@dataclass(frozen=True)
class PreparedJob:
    """The job row of one delivery, ready to insert once the delivery row has its id."""

    values: dict[str, Any]

    def add_in(self, connection: Connection, delivery_id: int) -> None:
        """The job row, in the delivery's transaction (synchronous: the mail store's database thread)."""
        _INSERT_JOB.run(connection, {"delivery_id": delivery_id, **self.values})

    @property
    def examined(self) -> bool:
        """Ended at delivery: the worker has nothing to do for it."""
        return bool(self.values["state"] != JobState.RECEIVED.value)


class FilingIntake:
    def __init__(self, fields: FieldSealer) -> None:
        self.sealer = RecordSealer(fields)

    async def prepare(self, *, delivery_key: str, mailbox_id: int, mailbox_type: str | None, recipient: str,
                      sender: str, headers: CachedHeaders | None) -> PreparedJob:
        now = utcnow()
        values: dict[str, Any] = {"delivery_key": delivery_key, "mailbox_id": mailbox_id, "attempts": 0,
                                  "documents_filed": 0, "state": JobState.RECEIVED.value, "created_at": now,
                                  "updated_at": now}
        if mailbox_type == PATIENT_MAILBOX or headers is None:
            return PreparedJob(values)
        subject = " ".join((headers.subject or "").split()) or None
        message_id = " ".join((headers.message_id or "").split())[:998] or None
        values.update(state=JobState.NOT_FILED.value, attempts=1, finished_at=now, message_id=message_id,
                      sender=sender[:320] or None, recipient=recipient[:320],
                      subject=await self.sealer.seal_for_mailbox(mailbox_id, JOB_SUBJECT_COLUMN, subject))
        return PreparedJob(values)
