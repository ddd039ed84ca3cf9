"""A small world for the filing, record and worker tests: directory, keys, blobs, mail store.

It holds the CI-SIS test patient (PAT-TROIS DOMINIQUE, INS 279035121518989,
OID 1.2.250.1.213.1.4.10) with a patient mailbox, a second patient, a doctor
with a professional mailbox, and builders of MIME messages carrying documents.
"""

from __future__ import annotations

import datetime as dt
import email.policy
from dataclasses import dataclass, replace
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from gateway.config import Settings
from gateway.directory.identifiers import add_luhn_key
from gateway.directory.service import DirectoryService
from gateway.dmp_bridge.depositor import Depositor, depositor_of_mailbox
from gateway.dmp_bridge.extract import extract_documents
from gateway.dmp_bridge.filing import FilingContext, FilingReport, file_into_record
from gateway.mailstore.notify import ChangeHub
from gateway.mailstore.sql import SqlMailStore
from gateway.security.keys import KeyManager
from gateway.security.passwords import PasswordHasher
from gateway.storage.blobs import BlobStore
from gateway.storage.db import Database
from gateway.storage.models import Mailbox, Patient
from sqlalchemy import select

SAMPLES = Path(__file__).parents[2].parent / "shared" / "samples"
PARIS = dt.timezone(dt.timedelta(hours=1))
BIO_V1 = "BIO-CR-BIO_2021.01_Microbiologie_V1.xml"
BIO_V2 = "BIO-CR-BIO_2021.01_Microbiologie_V2.xml"
TEST_INS = "279035121518989"
TEST_OID = "1.2.250.1.213.1.4.10"
OTHER_INS = "185077505612323"
PRO_DOMAIN = "demo.mssante.localhost"
LAB_ADDRESS = f"resultats.labo@{PRO_DOMAIN}"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


@dataclass
class World:
    db: Database
    settings: Settings
    directory: DirectoryService
    keys: KeyManager
    blobs: BlobStore
    hub: ChangeHub
    mailstore: SqlMailStore
    patient_id: int = 0
    patient_mailbox_id: int = 0
    patient_address: str = ""
    doctor_mailbox_id: int = 0
    doctor_address: str = ""
    lab_idnst: str = ""

    async def file(self, message: EmailMessage, *, to_patient_mailbox: bool = True, delivery_key: str | None = None,
                   accept_production: bool = False, sender: str = LAB_ADDRESS) -> FilingReport:
        """File ``message`` as the worker would, deposited by the owner of ``sender`` (the lab by default)."""
        context = FilingContext(delivery_key=delivery_key, message_id=str(message.get("Message-ID", "")),
                                sender=sender, depositor=await self.depositor(sender),
                                mailbox_patient_id=self.patient_id if to_patient_mailbox else None,
                                accept_production=accept_production)
        return await file_into_record(self.db, self.blobs, extract_documents(message), context)

    async def depositor(self, address: str) -> Depositor | None:
        async with self.db.session() as session:
            box = await session.scalar(select(Mailbox).where(Mailbox.address == address))
            found = await depositor_of_mailbox(session, box) if box is not None else None
        return replace(found, door="submission") if found is not None else None

    async def patient_row(self, ins: str = TEST_INS) -> Patient:
        async with self.db.session() as session:
            row = await session.scalar(select(Patient).where(Patient.ins == ins))
        assert row is not None
        return row


async def build_world(db: Database, settings: Settings) -> World:
    directory = DirectoryService(db, settings, PasswordHasher(time_cost=1, memory_kib=8, parallelism=1))
    keys = KeyManager(db, settings.data_path / "keys")
    blobs = BlobStore(settings.data_path / "blobs", keys)
    hub = ChangeHub()
    world = World(db, settings, directory, keys, blobs, hub, SqlMailStore(db, blobs, hub))
    await directory.add_local_domain(PRO_DOMAIN)
    await directory.add_local_domain(settings.directory.patient_domain, kind="patient")
    lab = await directory.add_organisation(id_type="SIRET", id_value=add_luhn_key("1234567800001"), name="LABO DEMO")
    doctor = await directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000001"), family_name="MEDECIN",
                                              given_name="Claire", profession_code="10")
    await directory.create_mailbox(address=LAB_ADDRESS, type="APP", owner=lab["idnst"])
    world.lab_idnst = lab["idnst"]
    world.doctor_address = (await directory.create_mailbox(address=f"claire.medecin@{PRO_DOMAIN}", type="PER",
                                                           owner=doctor["idnps"]))["address"]
    patient = await directory.add_patient(ins=TEST_INS, ins_oid=TEST_OID, birth_family_name="PAT-TROIS",
                                          first_given_name="DOMINIQUE", birth_date="1979-03-28", sex="F")
    await directory.add_patient(ins=OTHER_INS, ins_oid=TEST_OID, birth_family_name="MARTIN", first_given_name="PAUL",
                                birth_date="1985-07-14", sex="M")
    world.patient_address = patient["mailbox"]
    async with db.session() as session:
        boxes = {box.address: box for box in (await session.scalars(select(Mailbox))).all()}
    world.patient_mailbox_id = boxes[world.patient_address].id
    world.patient_id = int(boxes[world.patient_address].patient_id or 0)
    world.doctor_mailbox_id = boxes[world.doctor_address].id
    return world


def message_with(*attachments: tuple[str, bytes, str], subject: str = "Compte rendu", to: str = "",
                 mdn_to: str | None = None, sender: str = LAB_ADDRESS) -> EmailMessage:
    """A message from the lab with ``attachments`` as (file name, bytes, MIME type)."""
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = f"Laboratoire <{sender}>"
    message["To"] = to or f"<claire.medecin@{PRO_DOMAIN}>"
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=PRO_DOMAIN)
    message["Return-Path"] = f"<{sender}>"
    if mdn_to is not None:
        message["Disposition-Notification-To"] = mdn_to
    message.set_content("Veuillez trouver ci-joint le compte rendu.\n")
    for name, content, mime in attachments:
        maintype, subtype = mime.split("/", 1)
        message.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
    return message


def cda_message(name: str, **kwargs: str | None) -> EmailMessage:
    return message_with((name, sample(name), "text/xml"), **kwargs)  # type: ignore[arg-type]


def reparse(message: EmailMessage) -> EmailMessage:
    """The message as a reader gets it back from bytes (what the worker does)."""
    parsed = email.message_from_bytes(message.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


# Expected metadata of each sample, read by hand from the CDA headers.
SAMPLE_METADATA = [
    ("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", "1.2.250.1.213.1.1.1.45.2024.2.1", "18748-4",
     "CR d’imagerie médicale - Scanner Tête + Cou + Thorax avec injection", "801234560801", "Jacques BIDEAULT",
     "G15_10/SM44", dt.datetime(2021, 1, 8, 11, 17, tzinfo=PARIS), 2, "nonXMLBody"),
    (BIO_V1, "1.2.250.1.213.1.1.1.55.2021.6.1", "11502-2", "Compte rendu d'examens biologiques", "801234534765",
     "Marcel CAMPARINI", "G15_10/SM03", dt.datetime(2021, 1, 4, 16, 5, 27, tzinfo=PARIS), 1, "structuredBody"),
    ("LDL-SES_2022.01.xml", "1.2.250.1.213.1.1.1.29.2022.1.1", "11490-0",
     "Lettre de liaison à la sortie de l'établissement de santé", "801234567897", "Charles DAVID", "G15_10/SM27",
     dt.datetime(2019, 12, 3, 13, 30, tzinfo=PARIS), 1, "structuredBody"),
    ("VAC-NOTE_2023.01.xml", "1.2.250.1.213.1.1.1.46.2023.1.1", "87273-9", "NOTE DE VACCINATION", "801234567897",
     "Charles MULLER", "G15_10/SM26", dt.datetime(2021, 4, 9, 15, 35, tzinfo=PARIS), 1, "structuredBody"),
]
