"""The demo directory that ``gateway init --demo`` creates.

Fictitious organisations, professionals and patients with their mailboxes and
fresh random passwords, so that a person trying the gateway (or a test
harness) can log in at once. Identifiers pass their real check keys. The first
patient is the CI-SIS test patient of the ANS sample documents (INS-NIR test
279035121518989), so the sample reports file into a record out of the box.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from gateway.directory.identifiers import add_luhn_key, add_nir_key
from gateway.directory.service import DirectoryService
from gateway.security.pki import TestPKI

TEST_INS_OID = "1.2.250.1.213.1.4.10"
DEMO_REMOTE_DOMAIN = "autre-operateur.mssante.localhost"


@dataclass
class DemoAccount:
    address: str
    password: str
    type: str
    display_name: str
    owner: str
    client_certificate: str | None = None
    client_key: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "address": self.address, "password": self.password, "type": self.type,
            "display_name": self.display_name, "owner": self.owner,
        }
        if self.client_certificate:
            record["client_certificate"] = self.client_certificate
            record["client_key"] = self.client_key
        if self.notes:
            record["notes"] = self.notes
        return record


def _password() -> str:
    # Never a leading "-": pasted after a command-line option (swaks --auth-password, curl -u) it reads as one.
    password = secrets.token_urlsafe(12)
    return password if not password.startswith("-") else "x" + password[1:]


async def seed_demo_directory(directory: DirectoryService, pki: TestPKI, professional_domain: str) -> list[DemoAccount]:
    """Create the demo organisations, professionals, patients and mailboxes; return the accounts."""
    hospital = await directory.add_organisation(id_type="FINESS", id_value=add_luhn_key("75000001"),
                                                name="CENTRE HOSPITALIER DE DEMONSTRATION", postal_code="75013",
                                                address={"street": "1 rue de la Démonstration", "city": "PARIS"})
    lab = await directory.add_organisation(id_type="SIRET", id_value=add_luhn_key("1234567800001"),
                                           name="LABORATOIRE DE BIOLOGIE DEMO", postal_code="69003",
                                           address={"street": "12 avenue des Analyses", "city": "LYON"})
    doctor = await directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000001"), family_name="MEDECIN",
                                              given_name="Claire", civility="DR", profession_code="10",
                                              organisations=[hospital["idnst"]])
    pharmacist = await directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000002"), family_name="PHARMACIEN",
                                                  given_name="Marc", civility="M", profession_code="21")
    nurse = await directory.add_professional(id_type="RPPS", id_value=add_luhn_key("1000000003"), family_name="INFIRMIER",
                                             given_name="Sophie", civility="MME", profession_code="60",
                                             organisations=[hospital["idnst"]])

    accounts: list[DemoAccount] = []

    async def mailbox(local: str, box_type: str, owner: str, name: str) -> DemoAccount:
        password = _password()
        record = await directory.create_mailbox(address=f"{local}@{professional_domain}", type=box_type, owner=owner,
                                                display_name=name, password=password)
        account = DemoAccount(record["address"], password, box_type, name, owner)
        accounts.append(account)
        return account

    await mailbox("claire.medecin", "PER", doctor["idnps"], "Dr Claire MEDECIN")
    await mailbox("marc.pharmacien", "PER", pharmacist["idnps"], "Marc PHARMACIEN")
    await mailbox("sophie.infirmier", "PER", nurse["idnps"], "Sophie INFIRMIER")
    secretariat = await mailbox("secretariat.cardiologie", "ORG", hospital["idnst"], "Cardiologie - CH Démonstration")
    secretariat.notes.append("claire.medecin has read and send rights on this mailbox")
    await directory.delegate(secretariat.address, f"claire.medecin@{professional_domain}", ["read", "send"])
    lab_app = await mailbox("resultats.labo", "APP", lab["idnst"], "Résultats - Laboratoire demo")
    issued = pki.issue_client(name="demo-app-labo", common_name=lab_app.address, email=lab_app.address)
    await directory.register_certificate(lab_app.address, issued.certificate_pem, usage="auth")
    lab_app.client_certificate, lab_app.client_key = str(issued.cert_path), str(issued.key_path)
    lab_app.notes.append("authenticates with its client certificate (SASL EXTERNAL) or its password")

    for ins13, oid, family, given, given_all, birth, sex, place in (
        ("2790351215189", TEST_INS_OID, "PAT-TROIS", "DOMINIQUE", "DOMINIQUE MARIE-LOUISE", "1979-03-28", "F", "51215"),
        ("1850775056123", TEST_INS_OID, "MARTIN", "PAUL", "PAUL HENRI", "1985-07-14", "M", "75056"),
    ):
        password = _password()
        patient = await directory.add_patient(ins=add_nir_key(ins13), ins_oid=oid, birth_family_name=family,
                                              first_given_name=given, given_names=given_all, birth_date=birth, sex=sex,
                                              birthplace_code=place, password=password)
        accounts.append(DemoAccount(patient["mailbox"], password, "PAT", f"{given} {family}", patient["ins"],
                                    notes=["patient mailbox: reads in the webmail; may reply only to a professional who wrote first"]))

    await directory.trust_domain(DEMO_REMOTE_DOMAIN, operator="Opérateur de démonstration")
    return accounts
