"""Backups that restore: ``gateway backup create|verify|restore``.

A backup is a directory:

- ``manifest.json``: format, creation time, database kind and schema revision, and every file with its size
  and SHA-256 (``verify`` re-reads them all);
- ``database.sqlite`` (SQLite's online backup API: a consistent copy while the gateway writes) or
  ``database.pgdump`` (``pg_dump --format=custom``, one consistent snapshot);
- ``files/``: what the database points at and what serving needs: ``blobs/`` (message bodies and record
  documents, already encrypted under per-owner data keys), ``spool/`` (accepted messages not delivered yet,
  sealed), ``pki/``, ``dkim/`` and ``gateway.toml`` when present.

The per-owner data keys are in the database, wrapped. The key-encryption keys (``keys/``: ``kek-<n>.key``,
and beside them the audit chain's seal key and the webmail key) are NEVER in a backup: they are kept apart
(another medium, another custodian), so a stolen backup is ciphertext. ``restore --keys DIR`` copies them from
where they are kept; without them the restored data cannot be read (``verify --keys DIR`` checks that every
wrapped data key unwraps).

The database is copied first, then the files: a blob written after the copy is only an orphan, and a blob
deleted in between is reported by ``verify`` (expunged meanwhile).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.errors import Conflict, UserError
from gateway.storage.private import private_dir

FORMAT = "mss-gateway-backup/1"
KEPT_APART = ("keys",)                              # key-encryption keys and other secrets: never in a backup
FILE_TREES = ("blobs", "pki", "dkim")                # under data_dir (pki and dkim may live elsewhere: settings)
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Sources:
    """Where this data directory's parts live (settings may move the spool, the PKI or DKIM keys)."""

    data: Path
    spool: Path
    pki: Path
    dkim: Path
    blobs: Path | None = None   # cluster.blob_dir (shared by several nodes); None: <data>/blobs

    @classmethod
    def of(cls, settings: Settings) -> Sources:
        data = settings.data_path
        spool = Path(settings.smtp.spool_dir).expanduser().resolve() if settings.smtp.spool_dir else data / "spool"
        dkim = Path(settings.dkim.key_dir).expanduser().resolve() if settings.dkim.key_dir else data / "dkim"
        return cls(data, spool, settings.pki_path, dkim, settings.blob_path)

    def trees(self) -> dict[str, Path]:
        return {"blobs": self.blobs or self.data / "blobs", "spool": self.spool, "pki": self.pki, "dkim": self.dkim}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        destination = target / path.relative_to(source)
        private_dir(destination.parent)
        try:
            shutil.copyfile(path, destination)
        except FileNotFoundError:
            continue                                  # removed while copying (a delivered spool file)
        os.chmod(destination, 0o600)


def _backup_sqlite(url: str, target: Path) -> None:
    source_path = url.split("///", 1)[1]
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
    destination = sqlite3.connect(target)
    try:
        with destination:
            source.backup(destination)                # SQLite online backup: consistent while others write
        destination.execute("PRAGMA journal_mode=DELETE")   # one self-contained file (no -wal / -shm beside it)
    finally:
        destination.close()
        source.close()
    os.chmod(target, 0o600)


def _pg_dsn(url: str) -> str:
    """libpq's form of a SQLAlchemy URL (``postgresql+asyncpg://`` -> ``postgresql://``)."""
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgresql") else url


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{what} failed ({result.returncode}): {result.stderr.strip()[:500]}", field="database")


async def create(settings: Settings, destination: Path) -> dict[str, Any]:
    """Write a backup of this data directory into ``destination`` (created; must not exist or be empty)."""
    from gateway.storage.db import Database

    if destination.exists() and any(destination.iterdir()):
        raise Conflict(f"{destination} is not empty: a backup goes into a new directory", field="destination")
    private_dir(destination)
    database = Database(settings.database_url)
    try:
        revision = await database.current_revision()
    finally:
        await database.dispose()
    if settings.database_url.startswith("sqlite"):
        kind, database_file = "sqlite", "database.sqlite"
        _backup_sqlite(settings.database_url, destination / database_file)
    else:
        kind, database_file = "postgresql", "database.pgdump"
        _run(["pg_dump", "--format=custom", "--no-owner", "--file", str(destination / database_file),
              _pg_dsn(settings.database_url)], "pg_dump")
        os.chmod(destination / database_file, 0o600)
    sources = Sources.of(settings)
    for name, tree in sources.trees().items():
        if tree.is_dir():
            _copy_tree(tree, destination / "files" / name)
    if (sources.data / "gateway.toml").is_file():
        private_dir(destination / "files")
        shutil.copyfile(sources.data / "gateway.toml", destination / "files" / "gateway.toml")
    manifest = {
        "format": FORMAT, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "database": {"kind": kind, "file": database_file, "revision": revision},
        "kept_apart": "keys/ (key-encryption keys, audit seal key, webmail key): not in this backup",
        "files": _inventory(destination),
    }
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=2))
    os.chmod(destination / "manifest.json", 0o600)
    return {"backup": str(destination), "database": kind, "revision": revision, "files": len(manifest["files"])}


def _inventory(root: Path) -> dict[str, dict[str, Any]]:
    return {str(path.relative_to(root)): {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != "manifest.json"}


def read_manifest(backup: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((backup / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{backup}: no readable manifest.json ({error})", field="backup") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{backup}: not a gateway backup (format {found!r})", field="backup")
    files, database = manifest.get("files"), manifest.get("database")
    if not isinstance(files, dict) or not all(_inside(name) and isinstance(entry, dict)
                                              and isinstance(entry.get("sha256"), str)
                                              for name, entry in files.items()):
        raise UserError(f"{backup}: manifest.json lists files badly (names inside the backup, each with its sha256)",
                        field="manifest.files")
    if not isinstance(database, dict) or database.get("kind") not in ("sqlite", "postgresql") \
            or not _inside(database.get("file")):
        raise UserError(f"{backup}: manifest.json names no database (kind sqlite or postgresql, a file inside)",
                        field="manifest.database")
    return manifest


def _inside(name: object) -> bool:
    """A relative path that stays inside the backup folder (a manifest is read from a folder we did not write)."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def verify(backup: Path, keys_dir: Path | None = None) -> dict[str, Any]:
    """Every file as the manifest says, nothing added, no key-encryption key inside, the SQLite copy intact;
    with ``keys_dir`` (where the keys are kept apart), every wrapped data key unwraps."""
    manifest = read_manifest(backup)
    problems: list[str] = []
    present = {str(p.relative_to(backup)) for p in backup.rglob("*") if p.is_file() and p.name != "manifest.json"}
    listed = manifest["files"]
    problems += [f"missing: {name}" for name in sorted(set(listed) - present)]
    problems += [f"not in the manifest: {name}" for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present):
        if _sha256(backup / name) != listed[name]["sha256"]:
            problems.append(f"altered: {name}")
    problems += [f"a kept-apart key is inside: {name}" for name in sorted(present)
                 if Path(name).parts[:2] == ("files", "keys") or Path(name).name.startswith("kek-")]
    database = manifest["database"]
    if database["kind"] == "sqlite" and not problems:
        problems += _sqlite_problems(backup / database["file"], keys_dir)
    if problems:
        raise UserError(f"backup {backup} does not verify: {'; '.join(problems[:10])}", field="backup")
    return {"backup": str(backup), "verified_files": len(listed), "database": database["kind"],
            "revision": database["revision"], "data_keys_checked": keys_dir is not None}


def _sqlite_problems(path: Path, keys_dir: Path | None) -> list[str]:
    from gateway.security.keys import KekRing, unwrap_key

    connection = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)   # writes nothing beside it
    try:
        if connection.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            return ["database.sqlite fails PRAGMA integrity_check"]
        if keys_dir is None:
            return []
        keks = KekRing(keys_dir)
        problems = []
        rows = connection.execute("SELECT owner, kek_id, wrapped_key FROM data_keys WHERE wrapped_key IS NOT NULL")
        for owner, kek_id, wrapped in rows:
            try:
                unwrap_key(keks.key(int(kek_id)), owner, bytes(wrapped))
            except Exception:  # noqa: BLE001  (named below: a KEK missing or not the one that wrapped it)
                problems.append(f"data key of {owner} does not unwrap with the keys in {keys_dir}")
        return problems
    finally:
        connection.close()


def restore(settings: Settings, backup: Path, keys_dir: Path | None) -> dict[str, Any]:
    """Restore into this (empty) data directory and database; the backup is verified first."""
    manifest = read_manifest(backup)
    verify(backup, keys_dir)
    sources = Sources.of(settings)
    if (sources.data / "gateway.db").exists() or any((sources.data / name).exists() for name in ("blobs", "keys")):
        raise Conflict(f"{sources.data} is not empty: restore goes into an empty data directory", field="data_dir")
    private_dir(sources.data)
    database = manifest["database"]
    if database["kind"] == "sqlite":
        if not settings.database_url.startswith("sqlite"):
            raise UserError("a SQLite backup restores into a SQLite data directory (database.url empty)",
                            field="database.url")
        target = Path(settings.database_url.split("///", 1)[1])
        _backup_sqlite(f"sqlite:///{backup / database['file']}", target)
    else:
        if settings.database_url.startswith("sqlite"):
            raise UserError("a PostgreSQL backup restores into PostgreSQL (set database.url)", field="database.url")
        _run(["pg_restore", "--no-owner", "--exit-on-error", "--dbname", _pg_dsn(settings.database_url),
              str(backup / database["file"])], "pg_restore")
    for name, tree in sources.trees().items():
        if (backup / "files" / name).is_dir():
            _copy_tree(backup / "files" / name, tree)
    if (backup / "files" / "gateway.toml").is_file():
        shutil.copyfile(backup / "files" / "gateway.toml", sources.data / "gateway.toml")
    if keys_dir is not None:
        _copy_tree(keys_dir, sources.data / "keys")
    return {"restored": str(sources.data), "database": database["kind"], "revision": database["revision"],
            "keys": str(keys_dir) if keys_dir else "not restored: copy the kept-apart keys/ into the data directory"}
