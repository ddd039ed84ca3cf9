"""OpenPGP encryption of exports (audit log, mailbox) to an administrator's or auditor's key.

An export of health data may have to travel by mail or on a USB stick: ``--encrypt-to KEYFILE.asc``
encrypts it to the recipient's OpenPGP key with python-gnupg, ASCII-armoured. Each operation runs in
a throwaway GNUPGHOME (0700, its agent stopped and the directory removed afterwards), so the
operator's own keyrings are never read or changed. The recipient's key is imported from the file,
checked (exactly one key, not revoked, not expired, able to encrypt), named by fingerprint and
trusted for that one operation only (``--trust-model always`` on the encrypt call, no trust database
entry). The export is written into a pipe that gpg reads: the plaintext never touches the disk, and
the ciphertext appears under its final name only once gpg has finished.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gnupg  # python-gnupg ships no type information (see [tool.mypy] overrides)

from gateway.errors import UserError, read_named_file

FIELD = "--encrypt-to"
MAX_KEY_FILE_BYTES = 1024 * 1024  # an armoured public key is a few KB; a keyring dump is not what we want


@dataclass(frozen=True)
class OpenPgpRecipient:
    """The key an export is encrypted to."""

    fingerprint: str
    user_ids: tuple[str, ...]
    expires: dt.datetime | None

    def describe(self) -> str:
        names = ", ".join(self.user_ids) or "no user id"
        return f"{self.fingerprint} ({names})"


@dataclass
class EncryptedSink:
    """What ``encrypted_output`` yields: the stream to write the plaintext to, and who will read it."""

    stream: BinaryIO
    recipient: OpenPgpRecipient


@contextmanager
def encrypted_output(key_file: Path, target: Path, *, field: str = FIELD,
                     home_parent: Path | None = None) -> Iterator[EncryptedSink]:
    """Encrypt what is written to the yielded stream into ``target`` (armoured) for ``key_file``'s key.

    The key is checked before anything is written; UserError naming ``field`` when it is unusable.
    On an exception inside the block, nothing is left at ``target`` nor beside it.
    """
    with _throwaway_gpg(home_parent, field) as gpg:
        recipient = load_recipient(gpg, key_file, field=field)
        with _gpg_pipe(gpg, recipient, target, field) as stream:
            yield EncryptedSink(stream, recipient)


def load_recipient(gpg: gnupg.GPG, key_file: Path, *, field: str = FIELD,
                   now: dt.datetime | None = None) -> OpenPgpRecipient:
    """Import the one public key of ``key_file`` into ``gpg``'s home and check it can encrypt now."""
    result = gpg.import_keys(read_named_file(key_file, field, "a single OpenPGP public key", max_bytes=MAX_KEY_FILE_BYTES))
    fingerprints = sorted(set(result.fingerprints or ()))
    if not fingerprints:
        raise UserError(f"{key_file} holds no OpenPGP public key ({_import_problem(result)})", field=field)
    keys = [key for key in gpg.list_keys() if key["fingerprint"] in fingerprints]
    if len(keys) != 1:
        raise UserError(f"{key_file} holds {len(keys)} OpenPGP keys; give a file with the recipient's key only",
                        field=field)
    return _usable(keys[0], now or dt.datetime.now(dt.timezone.utc), field)


def _import_problem(result: Any) -> str:
    problems = [str(entry.get("text", "")).strip() for entry in getattr(result, "results", []) if entry.get("problem")]
    return "; ".join(problem for problem in problems if problem) or "not an OpenPGP key file"


def _usable(key: dict[str, Any], now: dt.datetime, field: str) -> OpenPgpRecipient:
    recipient = OpenPgpRecipient(key["fingerprint"], tuple(key.get("uids") or ()), _expiry(key.get("expires")))
    validity = key.get("trust", "")
    if validity == "r":
        raise UserError(f"key {recipient.describe()} is revoked", field=field)
    if validity == "e" or (recipient.expires is not None and recipient.expires <= now):
        when = f" on {recipient.expires:%Y-%m-%d}" if recipient.expires else ""
        raise UserError(f"key {recipient.describe()} expired{when}", field=field)
    if validity in ("i", "d"):
        raise UserError(f"key {recipient.describe()} is {'invalid' if validity == 'i' else 'disabled'}", field=field)
    # Upper-case capabilities are those of the whole key that are usable now (valid, unexpired subkeys).
    if "E" not in key.get("cap", ""):
        raise UserError(f"key {recipient.describe()} cannot encrypt (a signing-only key, or its encryption "
                        "subkey expired or was revoked)", field=field)
    return recipient


def _expiry(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(value), dt.timezone.utc) if value else None


@contextmanager
def _throwaway_gpg(parent: Path | None, field: str) -> Iterator[gnupg.GPG]:
    binary = shutil.which("gpg")
    if binary is None:
        raise UserError("gpg (GnuPG) is not installed: it is needed to encrypt an export", field=field)
    home = Path(tempfile.mkdtemp(prefix="gateway-gpg-", dir=parent))  # mode 0700
    try:
        yield gnupg.GPG(gpgbinary=binary, gnupghome=str(home))
    finally:
        # Stop whatever this home started (gpg-agent, dirmngr), and only that.
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def _gpg_pipe(gpg: gnupg.GPG, recipient: OpenPgpRecipient, target: Path, field: str) -> Iterator[BinaryIO]:
    """A pipe into ``gpg --encrypt``, which writes beside ``target``; renamed into place on success."""
    partial = _reserve_partial(target)
    read_fd, write_fd = os.pipe()
    worker = _EncryptWorker(gpg, recipient, read_fd, partial)
    worker.start()
    sink = os.fdopen(write_fd, "wb")
    try:
        try:
            yield sink
        except BrokenPipeError:  # gpg stopped reading: say what gpg said
            _finish(sink, worker)
            worker.check(field)
            raise UserError("gpg stopped reading the export before its end", field=field) from None
        _finish(sink, worker)
        worker.check(field)
        os.replace(partial, target)
    except BaseException:
        _finish(sink, worker)
        partial.unlink(missing_ok=True)
        raise


def _reserve_partial(target: Path) -> Path:
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))  # gpg keeps the mode
    except OSError as exc:
        raise UserError(f"cannot write beside {target}: {exc.strerror}", field="file") from None
    return partial


def _finish(sink: BinaryIO, worker: threading.Thread) -> None:
    """End of input for gpg (idempotent), then wait for it to write the file."""
    try:
        sink.close()
    except BrokenPipeError:
        pass  # gpg stopped reading: its own error says why
    worker.join()


class _EncryptWorker(threading.Thread):
    """Runs the blocking python-gnupg call: gpg reads the pipe and writes the armoured file."""

    def __init__(self, gpg: gnupg.GPG, recipient: OpenPgpRecipient, read_fd: int, output: Path) -> None:
        super().__init__(name="openpgp-encrypt", daemon=True)
        self.gpg, self.recipient, self.read_fd, self.output = gpg, recipient, read_fd, output
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        # Closing the read end when gpg is done makes a writer still going get BrokenPipeError, not a hang.
        with os.fdopen(self.read_fd, "rb") as source:
            try:
                self.result = self.gpg.encrypt_file(
                    source, [self.recipient.fingerprint], armor=True, always_trust=True, output=str(self.output),
                    extra_args=["--no-auto-key-locate", "--no-encrypt-to"])
            except Exception as exc:  # reported to the caller's thread by check()
                self.error = exc

    def check(self, field: str) -> None:
        if self.error is not None:
            raise UserError(f"gpg failed while encrypting: {self.error}", field=field)
        if self.result is None or not self.result.ok:
            status = getattr(self.result, "status", None) or "no result"
            detail = (getattr(self.result, "stderr", "") or "").strip().splitlines()
            reason = detail[-1] if detail else status
            raise UserError(f"gpg could not encrypt to {self.recipient.fingerprint}: {reason}", field=field)
