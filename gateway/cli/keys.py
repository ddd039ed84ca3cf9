"""``gateway keys``: encryption at rest — KEK rotation, status, crypto-shredding of closed patient spaces."""

from __future__ import annotations

import click

from gateway.cli.common import data_dir_option, emit_record, emit_rows, json_option, with_services
from gateway.retention import shred_expired_patients
from gateway.security.at_rest import key_status


@click.group()
def keys() -> None:
    """Key-encryption keys (files outside the database) and the per-owner data keys they wrap."""


@keys.command("status")
@data_dir_option
@json_option
def status(as_json: bool) -> None:
    """Current KEK, KEK files on disk, live data keys per KEK, shredded keys."""

    async def action(services: object) -> None:
        found = await key_status(services.db, services.keys)  # type: ignore[attr-defined]
        emit_record({"current_kek": found.current_kek, "kek_files": list(found.kek_files),
                     "data_keys_by_kek": {str(k): v for k, v in sorted(found.data_keys_by_kek.items())},
                     "destroyed_data_keys": found.destroyed, "missing_kek_files": list(found.missing_keks)},
                    as_json=as_json)
        if found.missing_keks:
            raise click.ClickException(f"KEK files missing for live data keys: {list(found.missing_keks)} "
                                       "(restore the keys directory from the key backup)")

    with_services(action)


@keys.command("rotate")
@data_dir_option
@click.option("--keep-old", is_flag=True, help="keep the old KEK files (default: retire those no data key uses)")
@json_option
def rotate(keep_old: bool, as_json: bool) -> None:
    """Create a new KEK and re-wrap every data key under it, batch by batch, while the gateway runs;
    then delete the KEK files nothing uses any more. Blobs are not rewritten."""

    async def action(services: object) -> None:
        manager = services.keys  # type: ignore[attr-defined]
        report = await manager.rotate_kek()
        retired = [] if keep_old else await manager.retire_unused_keks()
        emit_record({"new_kek": report.kek_id, "data_keys_rewrapped": report.rewrapped, "retired_keks": retired},
                    as_json=as_json)

    with_services(action)


@keys.command("shred-expired")
@data_dir_option
@click.option("--days", type=int, default=None,
              help="retention after closing, in days (default: the retention.closed_patient_days setting)")
@json_option
def shred_expired(days: int | None, as_json: bool) -> None:
    """Destroy the data keys of patient spaces closed longer than the retention period (crypto-shredding):
    their messages and record become unreadable everywhere, backups included. Irreversible."""

    async def action(services: object) -> None:
        settings = services.settings  # type: ignore[attr-defined]
        retention = settings.retention.closed_patient_days if days is None else days
        shredded = await shred_expired_patients(services.db, services.keys, retention,  # type: ignore[attr-defined]
                                                forget=services.fields.forget)  # type: ignore[attr-defined]
        emit_rows([{"ins": s.ins, "closed_at": s.closed_at, "owners": list(s.owners), "keys_destroyed": s.keys_destroyed}
                   for s in shredded], ["ins", "closed_at", "owners", "keys_destroyed"], as_json=as_json,
                  title=f"spaces shredded (closed more than {retention} days ago)")

    with_services(action)
