"""Everything the gateway writes is its own: files 0600, directories 0700, whatever the umask.

Three layers, so that no single forgotten place leaks health data to other local users:

- ``restrict_umask()`` at process start (the CLI entry): anything created without an explicit mode
  (a library's temporary file, SQLite's -wal/-shm, an export) is private from the start;
- explicit modes where files and directories are made (``private_dir``, ``create_private_file``,
  ``os.open(..., 0o600)`` in the blob store, spool, keys, PKI, audit exports);
- ``secure_data_dir(data_dir)`` when ``gateway serve`` starts: directories and files left by older
  versions, or copied in by an operator with a looser umask, are brought back to 0700 / 0600. The
  data directory itself is made 0700 first, so no other local user can reach anything below it,
  whatever the modes down there; the trees that grow with the mail (a blob per message) are walked
  whole once per data directory (see ``secure_data_dir``), not at every start.
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
# Written (0600) once a data directory was walked whole; its absence asks for a whole walk.
MODES_CHECKED = Path("run") / "modes-checked"
# The trees with an entry per message: 150,000 entries for 100,000 messages, most of a start's time.
BULK_TREES = ("blobs", "spool")


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


def secure_data_dir(root: Path, *, whole: bool = False) -> int:
    """The data directory's modes, as ``gateway serve`` checks them at every start; returns how many changed.

    The directory itself first (0700: from then on no other local user can open anything below it), then
    every entry outside the bulk trees (keys, PKI, the database and its -wal/-shm, run/: a few dozen) and
    the bulk trees' own top two levels. The bulk trees are walked whole when ``whole`` is asked
    (``gateway db upgrade``) or when the marker of a finished whole walk is missing (the first start over
    a directory an older version wrote: its leftovers are fixed once), then the marker is written. What
    the gateway writes itself is private from the start (umask 077, explicit modes), so later starts need
    not stat every blob again; to have a copied-in tree checked, remove ``run/modes-checked``."""
    if not root.is_dir():
        return 0
    marker = root / MODES_CHECKED
    whole = whole or not marker.exists()
    changed = _fix(root, PRIVATE_DIR)
    for name in os.listdir(root):
        path = root / name
        if name in BULK_TREES and not whole:
            changed += _fix(path, PRIVATE_DIR)
            if path.is_dir() and not path.is_symlink():
                changed += sum(_fix(path / inner, PRIVATE_DIR) for inner in os.listdir(path)
                               if (path / inner).is_dir())
        elif path.is_dir() and not path.is_symlink():
            changed += secure_tree(path)
        else:
            changed += _fix(path, PRIVATE_FILE)
    if whole:
        private_dir(marker.parent)
        create_private_file(marker)
    return changed


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
