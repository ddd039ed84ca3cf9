"""A running FHIR API over HTTPS on a loopback port, with a filed record and the people who want to read it.

The record of the CI-SIS test patient (INS 279035121518989) is filed with
``file_into_record`` from the real samples: a vaccination note (87273-9, by
Dr Charles MULLER, IDNPS 801234567897), a psychiatry summary made from that
note with its type changed to 68599-0, the microbiology report V1 and V2
(11502-2, V1 superseded) and the imaging report (18748-4). The directory
holds: that author (whose mailbox deposited the vaccination note and the
psychiatry summary; the lab's application deposited the others), the filing world's doctor (Claire MEDECIN), a second
doctor (the médecin traitant once the patient names her), a dentist, a
pharmacist, the lab's APP mailbox, and the patient's own mailbox.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.audit.chain import Actor, Door, Source
from gateway.audit.log import AuditLog
from gateway.config import Settings, load_settings
from gateway.directory.identifiers import add_luhn_key
from gateway.dmp_bridge.fhir.server import HttpListener, start_http_listener
from gateway.dmp_bridge.patient_choices import PatientChoicesService
from gateway.dmp_bridge.record import RecordStore
from gateway.security.pki import IssuedCertificate, TestPKI
from gateway.storage.db import Database
from tests.dmp_bridge.filing_world import LAB_ADDRESS, PRO_DOMAIN, TEST_INS, World, build_world, cda_message, \
    message_with, reparse, sample

PASSWORD = "correct horse battery staple"
AUTHOR_IDNPS = "801234567897"
PSY_TYPE = "68599-0"
VACCINATION_ID = "1.2.250.1.213.1.1.1.46.2023.1.1"
PSYCHIATRY_ID = "1.2.250.1.213.1.1.1.46.2023.9.1"
BIO_V1_ID = "1.2.250.1.213.1.1.1.55.2021.6.1"
IMAGING_ID = "1.2.250.1.213.1.1.1.45.2024.2.1"
PATIENT_QUERY = f"urn:oid:1.2.250.1.213.1.4.10|{TEST_INS}"


class RecordingNotifier:
    """The patient's notification channel as the lead wires it: here, a list the tests read."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.emergencies: list[str] = []

    async def notify_patient(self, ins: str, text: str, *, emergency: bool = False) -> None:
        self.sent.append((ins, text))
        if emergency:
            self.emergencies.append(ins)


@dataclass
class People:
    """Mailbox addresses and IDNPS of everyone who calls the API."""

    idnps: dict[str, str] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)


@dataclass
class Services:
    """What ``start_http_listener`` reads of the gateway's services."""

    db: Database
    blobs: Any
    directory: Any
    pki: TestPKI


@dataclass
class FhirWorld:
    world: World
    settings: Settings
    pki: TestPKI
    audit: AuditLog
    choices: PatientChoicesService
    notifier: RecordingNotifier
    people: People
    listener: HttpListener | None = None
    documents: dict[str, str] = field(default_factory=dict)  # unique id -> FHIR id

    @property
    def base_url(self) -> str:
        assert self.listener is not None
        _host, port = self.listener.addresses()[0]
        return f"https://localhost:{port}/fhir"

    def tls(self, certificate: IssuedCertificate | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_bundle_path))
        if certificate is not None:
            context.load_cert_chain(str(certificate.chain_path), str(certificate.key_path))
        return context

    @asynccontextmanager
    async def client(self, who: str | None = None, *, certificate: IssuedCertificate | None = None,
                     password: str = PASSWORD) -> AsyncIterator[httpx.AsyncClient]:
        """A real HTTPS client: as ``who`` (Basic with their mailbox), or with a client certificate, or anonymous."""
        auth = (self.people.addresses[who], password) if who else None
        async with httpx.AsyncClient(base_url=self.base_url, verify=self.tls(certificate), auth=auth,
                                     timeout=30) as client:
            yield client

    async def restart(self, **fhir: Any) -> None:
        """Serve again with these ``[fhir]`` settings (e.g. ``emergency_access_professions``)."""
        assert self.listener is not None
        await self.listener.aclose()
        self.settings = load_settings(data_dir=self.settings.data_dir, environ={},
                                      overrides={"listen": {"host": "127.0.0.1", "http_port": 0}, "fhir": fhir})
        self.listener = await start_http_listener(Services(self.world.db, self.world.blobs, self.world.directory,
                                                           self.pki), self.settings, audit=self.audit,
                                                  notifier=self.notifier)

    def patient_actor(self) -> tuple[Actor, Source]:
        return Actor.patient(TEST_INS, "DOMINIQUE PAT-TROIS"), Source(Door.WEBMAIL, "127.0.0.1")


async def _professional(world: World, people: People, key: str, rpps: str, family: str, profession: str,
                        *, idnps: str | None = None) -> None:
    directory = world.directory
    created = await directory.add_professional(idnps=idnps, id_type=None if idnps else "RPPS",
                                               id_value=None if idnps else add_luhn_key(rpps),
                                               family_name=family, given_name="Test", profession_code=profession)
    box = await directory.create_mailbox(address=f"{key}@{PRO_DOMAIN}", type="PER", owner=created["idnps"])
    await directory.set_password(box["address"], PASSWORD)
    people.idnps[key], people.addresses[key] = created["idnps"], box["address"]


async def _people(world: World) -> People:
    people = People()
    await _professional(world, people, "author", "", "MULLER", "10", idnps=AUTHOR_IDNPS)
    await _professional(world, people, "traitant", "1000000002", "TRAITANT", "10")
    await _professional(world, people, "dentist", "1000000003", "DENTISTE", "40")
    await _professional(world, people, "pharmacist", "1000000004", "PHARMACIEN", "21")
    await _professional(world, people, "nobody", "1000000005", "AUTRE", "86")  # a profession the matrix grants nothing
    people.addresses["doctor"] = world.doctor_address
    people.idnps["doctor"] = (await world.directory.show_mailbox(world.doctor_address))["owner"]
    await world.directory.set_password(world.doctor_address, PASSWORD)
    for key, address in (("lab", LAB_ADDRESS), ("patient", world.patient_address)):
        await world.directory.set_password(address, PASSWORD)
        people.addresses[key] = address
    return people


def psychiatry_summary() -> bytes:
    """The vaccination note turned into a psychiatry summary (another type, id and setId)."""
    text = sample("VAC-NOTE_2023.01.xml").decode("utf-8")
    text = text.replace('<code code="87273-9" displayName="Note de vaccination"',
                        f'<code code="{PSY_TYPE}" displayName="Synthèse psychiatrique"', 1)
    text = text.replace(f'<id root="{VACCINATION_ID}"/>', f'<id root="{PSYCHIATRY_ID}"/>', 1)
    text = text.replace('<setId root="1.2.250.1.213.1.1.1.46.2023.1"/>', '<setId root="1.2.250.1.213.1.1.1.46.2023.9"/>', 1)
    return text.encode("utf-8")


async def _file_record(world: World, people: People) -> None:
    """The author's own mailbox deposits the vaccination note and the psychiatry summary (they may update
    them); the lab's application deposits the rest."""
    author = people.addresses["author"]
    for name, sender in (("VAC-NOTE_2023.01.xml", author), ("BIO-CR-BIO_2021.01_Microbiologie_V1.xml", LAB_ADDRESS),
                         ("BIO-CR-BIO_2021.01_Microbiologie_V2.xml", LAB_ADDRESS),
                         ("IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml", LAB_ADDRESS)):
        report = await world.file(reparse(cda_message(name)), sender=sender)
        assert report.in_record, name
    report = await world.file(reparse(message_with(("psy.xml", psychiatry_summary(), "text/xml"))), sender=author)
    assert report.in_record


async def _fhir_ids(world: World) -> dict[str, str]:
    store = RecordStore(world.db, world.blobs)
    return {document.unique_id: str(document.id) for document in await store.list_for_patient(TEST_INS)}


@asynccontextmanager
async def running_fhir(database: Database, tmp_path: Path) -> AsyncIterator[FhirWorld]:
    settings = load_settings(data_dir=tmp_path / "data", environ={},
                             overrides={"listen": {"host": "127.0.0.1", "http_port": 0}})
    world = await build_world(database, settings)
    pki = TestPKI(settings.pki_path)
    pki.init()
    audit = AuditLog.for_data_dir(database, settings.data_path)
    notifier = RecordingNotifier()
    fhir = FhirWorld(world, settings, pki, audit, PatientChoicesService(database, audit), notifier,
                     await _people(world))
    await _file_record(world, fhir.people)
    fhir.documents = await _fhir_ids(world)
    fhir.listener = await start_http_listener(Services(database, world.blobs, world.directory, pki), settings,
                                              audit=audit, notifier=notifier)
    try:
        yield fhir
    finally:
        await fhir.listener.aclose()
