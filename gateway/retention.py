"""Retention: crypto-shredding of closed patient spaces once their retention has passed.

A patient who closes their space (gateway.dmp_bridge.patient_space) starts a
clock of ``retention.closed_patient_days``; past it, the data keys of their
mailbox (messages, cached headers, held S/MIME keys, decrypted copies) and of
their record (``patient:<INS>``) are destroyed, so everything of theirs is
unreadable, backups included (gateway.security.keys). This sits above both the
key store (gateway.security) and the record (gateway.dmp_bridge), which it
joins: neither imports the other for it.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from gateway.dmp_bridge.record import patient_owner
from gateway.mailstore.blind_index import BlindIndex
from gateway.ops.periodic import PeriodicTask
from gateway.security.at_rest import FieldSealer
from gateway.security.keys import KeyManager, mailbox_owner
from gateway.storage.advisory import run_alone
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Patient, PatientState

log = logging.getLogger("gateway.retention")
CLOCK_SKEW = dt.timedelta(minutes=5)   # between nodes' clocks: keys destroyed this long before a pass are forgotten again


@dataclass(frozen=True)
class ShreddedSpace:
    ins: str
    closed_at: dt.datetime
    owners: tuple[str, ...]
    keys_destroyed: int


async def shred_expired_patients(db: Database, keys: KeyManager, retention_days: int, *,
                                 now: dt.datetime | None = None,
                                 forget: Callable[[str], None] | None = None) -> list[ShreddedSpace]:
    """Destroy the data keys of every patient whose space was closed more than ``retention_days`` ago:
    their mailbox (messages, cached headers, held S/MIME keys, decrypted copies) and their record
    (``patient:<INS>``). Idempotent: a space already shredded destroys nothing more."""
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(days=retention_days)
    async with db.session() as session:
        rows = (await session.execute(
            select(Patient.id, Patient.ins, Patient.state_changed_at, Mailbox.id)
            .outerjoin(Mailbox, Mailbox.patient_id == Patient.id)
            .where(Patient.state == PatientState.CLOSED.value, Patient.state_changed_at <= cutoff))).all()
    shredded: list[ShreddedSpace] = []
    for _patient_id, ins, closed_at, mailbox_id in rows:
        assert closed_at is not None  # the WHERE clause compared it with the cutoff
        owners = (patient_owner(ins), *((mailbox_owner(mailbox_id),) if mailbox_id is not None else ()))
        if mailbox_id is not None:
            async with db.session() as session:
                await BlindIndex.delete_mailbox_tokens(session, mailbox_id)
        destroyed = 0
        for owner in owners:
            destroyed += await keys.destroy_owner_key(owner)
            if forget is not None:
                forget(owner)
        if destroyed:
            shredded.append(ShreddedSpace(ins, closed_at, owners, destroyed))
    if shredded:
        # Backups of the database made before now still hold these data keys, wrapped under the
        # current KEK: re-wrap the live keys under a new KEK and delete the old KEK files, so those
        # backups no longer unwrap (the keys directory is backed up apart, on its own schedule).
        await keys.rotate_kek()
        await keys.retire_unused_keks()
    return shredded


class ShreddingTask(PeriodicTask):
    """``gateway serve``'s periodic crypto-shredding of closed patient spaces past their retention."""

    name = "crypto-shredding"

    def __init__(self, db: Database, keys: KeyManager, fields: FieldSealer, *, retention_days: int,
                 interval_seconds: float, index: BlindIndex | None = None) -> None:
        super().__init__(interval_seconds=interval_seconds)
        self.db = db
        self.keys = keys
        self.fields = fields
        self.index = index   # the mail store's search index keys, derived from the data keys destroyed here
        self.retention_days = retention_days
        self._forgotten_until = dt.datetime.now(dt.timezone.utc)   # keys destroyed before: never unwrapped here

    async def run_once(self) -> list[ShreddedSpace]:
        """One pass, on one node at a time (several nodes share the database: the others skip this turn)."""
        shredded: list[ShreddedSpace] = []
        async with run_alone(self.db, "crypto-shredding") as alone:
            if alone:
                shredded = await shred_expired_patients(self.db, self.keys, self.retention_days, forget=self._forget)
        await self.forget_shredded_elsewhere()
        for space in shredded:
            log.warning("crypto-shredded the space of patient %s (closed %s): %d data keys destroyed",
                        space.ins, space.closed_at.date(), space.keys_destroyed)
        return shredded

    async def forget_shredded_elsewhere(self) -> set[str]:
        """Drop from this process the keys another node (or `gateway keys shred-expired`) destroyed since the
        last pass: its caches must not keep decrypting a shredded space."""
        now = dt.datetime.now(dt.timezone.utc)
        owners = await self.keys.destroyed_since(self._forgotten_until - CLOCK_SKEW)
        self._forgotten_until = now
        for owner in owners:
            self.keys.forget_cached(owner)
            self._forget(owner)
        return owners

    def _forget(self, owner: str) -> None:
        self.fields.forget(owner)
        if self.index is not None:
            self.index.forget(owner)
