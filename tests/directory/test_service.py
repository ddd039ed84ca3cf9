"""The directory's rules, on SQLite and PostgreSQL: what it accepts, what it refuses and why."""

from __future__ import annotations

import pytest

from gateway.config import Settings
from gateway.directory.addresses import normalise_domain
from gateway.directory.identifiers import add_luhn_key, add_nir_key
from gateway.directory.service import DirectoryService, LocalRoute, RefusedRoute, RemoteRoute, RouteRefusal
from gateway.errors import Conflict, NotFound, UserError
from gateway.security.passwords import PasswordHasher
from gateway.storage.db import Database

PRO_DOMAIN = "demo.mssante.localhost"
PATIENT_DOMAIN = "patient.mssante.localhost"
RPPS = add_luhn_key("1000000009")
FINESS = add_luhn_key("75000009")
INS = add_nir_key("2790351215189")
TEST_OID = "1.2.250.1.213.1.4.10"
PASSWORD = "correct horse battery"


@pytest.fixture
async def directory(database: Database, settings: Settings) -> DirectoryService:
    service = DirectoryService(database, settings, PasswordHasher.from_settings(settings.auth))
    await service.add_local_domain(PRO_DOMAIN)
    await service.add_local_domain(PATIENT_DOMAIN, kind="patient")
    await service.trust_domain("other.mssante.fr", operator="Other operator")
    return service


@pytest.fixture
async def doctor(directory: DirectoryService) -> dict:
    await directory.add_organisation(id_type="FINESS", id_value=FINESS, name="CH TEST")
    pro = await directory.add_professional(id_type="RPPS", id_value=RPPS, family_name="DUPONT", given_name="Anne",
                                           profession_code="10", organisations=["1" + FINESS])
    await directory.create_mailbox(address=f"anne.dupont@{PRO_DOMAIN}", type="PER", owner=pro["idnps"], password=PASSWORD)
    return pro


async def patient(directory: DirectoryService, **overrides: str) -> dict:
    fields = dict(ins=INS, ins_oid=TEST_OID, birth_family_name="pat-trois", first_given_name="DOMINIQUE",
                  birth_date="1979-03-28", sex="F", password=PASSWORD)
    fields.update(overrides)
    return await directory.add_patient(**fields)


async def test_professional_gets_idnps_and_profession_label(directory: DirectoryService, doctor: dict) -> None:
    assert doctor["idnps"] == "8" + RPPS
    assert doctor["profession_label"].lower().startswith("m")  # Médecin
    shown = await directory.show_professional(doctor["idnps"])
    assert shown["organisations"] == ["1" + FINESS]
    assert shown["mailboxes"] == [f"anne.dupont@{PRO_DOMAIN}"]


async def test_patient_mailbox_is_ins_at_patient_domain(directory: DirectoryService) -> None:
    record = await patient(directory)
    assert record["mailbox"] == f"{INS}@{PATIENT_DOMAIN}"
    assert record["birth_family_name"] == "PAT-TROIS"


@pytest.mark.parametrize("ins, message", [
    (INS[:-2] + "00", "wrong INS key"),
    ("27903512151898", "15 characters"),
    ("979035121518989", "not an INS"),
])
async def test_invalid_ins_refused(directory: DirectoryService, ins: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        await patient(directory, ins=ins)
    assert caught.value.field == "ins"


async def test_unknown_ins_oid_refused(directory: DirectoryService) -> None:
    with pytest.raises(UserError, match="not an INS OID") as caught:
        await patient(directory, ins_oid="1.2.250.1.213.1.4.13")
    assert caught.value.field == "ins_oid"


async def test_invalid_rpps_key_refused(directory: DirectoryService) -> None:
    bad = RPPS[:-1] + str((int(RPPS[-1]) + 1) % 10)
    with pytest.raises(UserError, match="Luhn") as caught:
        await directory.add_professional(id_type="RPPS", id_value=bad, family_name="X", profession_code="10")
    assert caught.value.field == "idnps"


async def test_unknown_profession_code_refused(directory: DirectoryService) -> None:
    with pytest.raises(UserError) as caught:
        await directory.add_professional(id_type="RPPS", id_value=RPPS, family_name="X", profession_code="9999")
    assert caught.value.field == "profession_code"


async def test_duplicate_address_refused(directory: DirectoryService, doctor: dict) -> None:
    with pytest.raises(Conflict, match="exists already") as caught:
        await directory.create_mailbox(address=f"Anne.Dupont@{PRO_DOMAIN.upper()}", type="PER", owner=doctor["idnps"])
    assert caught.value.field == "address"


async def test_mailbox_in_untrusted_domain_refused(directory: DirectoryService, doctor: dict) -> None:
    with pytest.raises(UserError, match="neither one of our domains nor on the trust list"):
        await directory.create_mailbox(address="anne@gmail.com", type="PER", owner=doctor["idnps"])


async def test_mailbox_in_trusted_domain_is_a_remote_entry_without_credentials(directory: DirectoryService, doctor: dict) -> None:
    record = await directory.create_mailbox(address="anne@other.mssante.fr", type="PER", owner=doctor["idnps"])
    assert record["hosted"] is False
    with pytest.raises(UserError, match="another operator"):
        await directory.set_password("anne@other.mssante.fr", PASSWORD)


async def test_owner_must_match_type(directory: DirectoryService, doctor: dict) -> None:
    with pytest.raises(NotFound) as caught:
        await directory.create_mailbox(address=f"service@{PRO_DOMAIN}", type="ORG", owner=doctor["idnps"])
    assert caught.value.field == "owner"


async def test_address_and_type_are_fixed(directory: DirectoryService, doctor: dict) -> None:
    for field in ("address", "type"):
        with pytest.raises(Conflict, match="fixed") as caught:
            await directory.update_mailbox(f"anne.dupont@{PRO_DOMAIN}", **{field: "x"})
        assert caught.value.field == field


async def test_weak_password_refused(directory: DirectoryService, doctor: dict) -> None:
    with pytest.raises(UserError) as caught:
        await directory.set_password(f"anne.dupont@{PRO_DOMAIN}", "short")
    assert caught.value.field == "password"


async def test_authenticate(directory: DirectoryService, doctor: dict) -> None:
    account = await directory.authenticate(f"ANNE.DUPONT@{PRO_DOMAIN}", PASSWORD)
    assert account is not None and account.address == f"anne.dupont@{PRO_DOMAIN}"
    assert await directory.authenticate(f"anne.dupont@{PRO_DOMAIN}", PASSWORD + "x") is None
    assert await directory.authenticate(f"nobody@{PRO_DOMAIN}", PASSWORD) is None
    await directory.update_mailbox(f"anne.dupont@{PRO_DOMAIN}", state="disabled")
    assert await directory.authenticate(f"anne.dupont@{PRO_DOMAIN}", PASSWORD) is None


async def test_delegation_grants_send_as(directory: DirectoryService, doctor: dict) -> None:
    await directory.create_mailbox(address=f"cardiologie@{PRO_DOMAIN}", type="ORG", owner="1" + FINESS)
    account = await directory.authenticate(f"anne.dupont@{PRO_DOMAIN}", PASSWORD)
    assert account is not None and not account.may_send_as(f"cardiologie@{PRO_DOMAIN}")
    await directory.delegate(f"cardiologie@{PRO_DOMAIN}", f"anne.dupont@{PRO_DOMAIN}", ["send", "read"])
    account = await directory.authenticate(f"anne.dupont@{PRO_DOMAIN}", PASSWORD)
    assert account is not None and account.may_send_as(f"cardiologie@{PRO_DOMAIN}")
    with pytest.raises(UserError, match="rights must be among"):
        await directory.delegate(f"cardiologie@{PRO_DOMAIN}", f"anne.dupont@{PRO_DOMAIN}", ["admin"])


async def test_route_recipient(directory: DirectoryService, doctor: dict) -> None:
    assert isinstance(await directory.route_recipient(f"Anne.Dupont@{PRO_DOMAIN}"), LocalRoute)
    remote = await directory.route_recipient("someone@other.mssante.fr")
    assert isinstance(remote, RemoteRoute) and remote.domain == "other.mssante.fr"
    unknown = await directory.route_recipient(f"nobody@{PRO_DOMAIN}")
    assert isinstance(unknown, RefusedRoute) and unknown.reason is RouteRefusal.UNKNOWN_MAILBOX
    outside = await directory.route_recipient("someone@gmail.com")
    assert isinstance(outside, RefusedRoute) and outside.reason is RouteRefusal.DOMAIN_NOT_TRUSTED


@pytest.mark.parametrize("state, reason", [("opposed", RouteRefusal.PATIENT_OPPOSED), ("closed", RouteRefusal.PATIENT_CLOSED)])
async def test_opposed_or_closed_patient_receives_nothing(directory: DirectoryService, state: str, reason: RouteRefusal) -> None:
    record = await patient(directory)
    assert isinstance(await directory.route_recipient(record["mailbox"]), LocalRoute)
    await directory.update_patient(INS, state=state)
    route = await directory.route_recipient(record["mailbox"])
    assert isinstance(route, RefusedRoute) and route.reason is reason
    assert await directory.authenticate(record["mailbox"], PASSWORD) is None


async def test_trust_window(directory: DirectoryService) -> None:
    await directory.trust_domain("future.mssante.fr", since="2999-01-01")
    assert not await directory.is_trusted_domain("future.mssante.fr")
    await directory.trust_domain("past.mssante.fr", since="2000-01-01", until="2001-01-01")
    assert not await directory.is_trusted_domain("past.mssante.fr")
    assert await directory.is_trusted_domain("OTHER.mssante.fr")


async def test_idn_domains_compare_after_normalisation(directory: DirectoryService) -> None:
    await directory.trust_domain("hôpital-test.mssante.fr")
    ascii_name = normalise_domain("hôpital-test.mssante.fr")
    assert ascii_name.startswith("xn--")
    assert await directory.is_trusted_domain(ascii_name)
    assert await directory.is_trusted_domain("HÔPITAL-TEST.mssante.fr")


async def test_local_domain_cannot_be_trusted_domain(directory: DirectoryService) -> None:
    with pytest.raises(Conflict, match="local domains"):
        await directory.trust_domain(PRO_DOMAIN)
    with pytest.raises(Conflict, match="trust list"):
        await directory.add_local_domain("other.mssante.fr")


async def test_fixed_national_ids(directory: DirectoryService, doctor: dict) -> None:
    with pytest.raises(Conflict) as caught:
        await directory.update_professional(doctor["idnps"], idnps="8" + add_luhn_key("1000000010"))
    assert caught.value.field == "idnps"
    with pytest.raises(UserError, match="nothing to change"):
        await directory.update_professional(doctor["idnps"])


async def test_search(directory: DirectoryService, doctor: dict) -> None:
    assert [p["idnps"] for p in await directory.list_professionals(query="dupo")] == [doctor["idnps"]]
    assert await directory.list_professionals(query="zzz") == []
    assert [o["name"] for o in await directory.list_organisations(query="ch t")] == ["CH TEST"]
