"""Everything the gateway writes is its own: files 0600, directories 0700, whatever the umask.

Three layers, so that no single forgotten place leaks health data to other local users:

- ``restrict_umask()`` at process start (the CLI entry): anything created without an explicit mode
  (a library's temporary file, SQLite's -wal/-shm, an export) is private from the start;
- explicit modes where files and directories are made (``private_dir``, ``create_private_file``,
  ``os.open(..., 0o600)`` in the blob store, spool, keys, PKI, audit exports);
- ``secure_tree(data_dir)`` when ``gateway serve`` starts: directories and files left by older
  versions, or copied in by an operator with a looser umask, are brought back to 0700 / 0600.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("gateway.storage")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
PRIVATE_UMASK = 0o077


def restrict_umask() -> int:
    """Make files created from now on private to the gateway's user; returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) 0700; an existing directory is brought to 0700 too.
    (mkdir's mode is filtered by the umask and ignored for a directory that exists.)"""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR:
        path.chmod(PRIVATE_DIR)
    return path


def create_private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 if missing; make an existing one 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


def secure_tree(root: Path) -> int:
    """Every directory under ``root`` (itself included) 0700, every regular file 0600; symbolic links
    are not followed. Returns how many modes were changed."""
    if not root.is_dir():
        return 0
    changed = _fix(root, PRIVATE_DIR)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            changed += _fix(Path(directory) / name, PRIVATE_DIR)
        for name in files:
            changed += _fix(Path(directory) / name, PRIVATE_FILE)
    return changed


def _fix(path: Path, mode: int) -> int:
    try:
        current = path.lstat()
    except FileNotFoundError:                       # removed meanwhile (a spool file delivered)
        return 0
    if stat.S_ISLNK(current.st_mode) or stat.S_IMODE(current.st_mode) == mode:
        return 0
    if not (stat.S_ISDIR(current.st_mode) or stat.S_ISREG(current.st_mode)):
        return 0
    try:
        path.chmod(mode)
    except FileNotFoundError:
        return 0
    except PermissionError:
        log.warning("%s: mode %o left as is (not ours to change); make it %o", path, stat.S_IMODE(current.st_mode), mode)
        return 0
    return 1
