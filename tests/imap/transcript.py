"""Run James-MPT-style IMAP transcripts against a real server on loopback.

A script (``tests/imap/scripts/*.txt``) is a list of lines:

- ``C: text``  the client sends ``text`` CRLF (variables substituted);
- ``M: text``  one line of a message literal that belongs to the previous
  ``C:`` line, which ends in ``{*}``: the runner replaces ``{*}`` by the
  LITERAL+ marker ``{n+}`` (RFC 7888) and sends the lines joined by CRLF;
- ``S: regex`` the next line from the server must match (``re.fullmatch``).
  A server line ending in a literal ``{n}`` is followed by the literal's lines
  and then the rest of the response, each matched by its own ``S:`` line
  (with the literal marker itself on the first one), as in James MPT;
- ``# ...`` a comment; ``#! plain`` on the first line connects without TLS
  (the script then runs STARTTLS, after which the runner upgrades the socket);
- ``C2: text`` / ``S2: regex`` (any digit): the same on a second (third...)
  connection of the same script, opened over TLS when first used, so that
  transcripts can interleave sessions (another client expunging, RFC 3501 7.4.1).

Variables: ``{user}``/``{password}`` (a fresh account made for the script),
``{delegate}`` (a mailbox delegated to it, read right), ``{other}`` (an
address that is *not* delegated to it).  In ``S:`` lines they are escaped.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
_LITERAL_AT_END = re.compile(rb"\{(\d+)\}$")


@dataclass
class Step:
    kind: str                  # "C" or "S"
    text: str
    line_number: int
    message: list[str] = field(default_factory=list)
    connection: int = 1


@dataclass(frozen=True)
class Script:
    name: str
    steps: list[Step]
    plain: bool


def load(path: Path) -> Script:
    steps: list[Step] = []
    plain = False
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if number == 1 and raw.strip() == "#! plain":
            plain = True
            continue
        if not raw.strip() or raw.startswith("#"):
            continue
        kind, _, text = raw.partition(": ")
        if kind == "M" or raw == "M:":
            steps[-1].message.append(text if kind == "M" else "")
            continue
        connection = 1
        if re.fullmatch(r"[CS][1-9]", kind):
            kind, connection = kind[0], int(kind[1:])
        if kind not in ("C", "S"):
            raise ValueError(f"{path.name}:{number}: expected C:, S:, M: or #, got {raw!r}")
        steps.append(Step(kind, text, number, connection=connection))
    return Script(path.stem, steps, plain)


class TranscriptError(AssertionError):
    pass


class TranscriptRunner:
    """One connection, driven by one script."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, variables: dict[str, str], *,
                 plain: bool) -> None:
        self.context = context
        self.variables = variables
        raw = socket.create_connection((host, port), timeout=15)
        self.sock: socket.socket = raw if plain else context.wrap_socket(raw)
        self.buffer = b""
        self.pending: list[bytes] = []       # lines of a literal (and the rest) not yet matched
        self.seen: list[str] = []
        self.awaiting_tls = False

    # --- substitution --------------------------------------------------------------------

    def client_text(self, text: str) -> str:
        for name, value in self.variables.items():
            text = text.replace("{" + name + "}", value)
        return text

    def server_regex(self, text: str) -> str:
        for name, value in self.variables.items():
            text = text.replace("{" + name + "}", re.escape(value))
        return text

    # --- I/O ---------------------------------------------------------------------------------

    def send(self, step: Step) -> None:
        if step.message:
            literal = "\r\n".join(step.message).encode()
            line = step.text.replace("{*}", f"{{{len(literal)}+}}")
            data = self.client_text_keep_literal(line).encode() + b"\r\n" + literal + b"\r\n"
        else:
            data = self.client_text(step.text).encode() + b"\r\n"
        self.seen.append(f"C: {data[:200]!r}")
        self.awaiting_tls = data.split(b" ")[1:2] == [b"STARTTLS\r\n"] or data.upper().endswith(b" STARTTLS\r\n")
        self.sock.sendall(data)

    def client_text_keep_literal(self, line: str) -> str:
        marker = re.search(r"\{\d+\+\}$", line)
        head = line[: marker.start()] if marker else line
        return self.client_text(head) + (marker.group(0) if marker else "")

    def _read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TranscriptError("server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TranscriptError("server closed the connection inside a literal")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def next_line(self) -> bytes:
        """The next line to match; a response with literals is split at each literal's lines."""
        if not self.pending:
            self.pending = self._response_lines()
        return self.pending.pop(0)

    def _response_lines(self) -> list[bytes]:
        line = self._read_line()
        lines = [line]
        while match := _LITERAL_AT_END.search(line):
            literal = self._read_exact(int(match.group(1)))
            parts = literal.split(b"\r\n")
            if parts and parts[-1] == b"":
                parts.pop()
            line = self._read_line()
            lines += parts + [line]
        return lines

    def expect(self, step: Step) -> None:
        try:
            line = self.next_line().decode("utf-8", "replace")
        except OSError as error:
            history = "\n".join(self.seen[-12:])
            raise TranscriptError(f"line {step.line_number}: no answer ({error}) for /{step.text}/\n{history}") from error
        self.seen.append(f"S: {line[:300]}")
        pattern = self.server_regex(step.text)
        if not re.fullmatch(pattern, line):
            history = "\n".join(self.seen[-12:])
            raise TranscriptError(f"line {step.line_number}: expected /{pattern}/\n got  {line!r}\n{history}")
        if self.awaiting_tls and re.fullmatch(r"\S+ OK .*", line):
            # RFC 3501 6.2.1: the handshake starts right after the tagged OK.
            self.sock = self.context.wrap_socket(self.sock)
            self.awaiting_tls = False

    def close(self) -> None:
        self.sock.close()


def run_script(script: Script, host: str, port: int, context: ssl.SSLContext, variables: dict[str, str],
               tls_port: int | None = None) -> None:
    runners = {1: TranscriptRunner(host, port, context, variables, plain=script.plain)}
    try:
        for step in script.steps:
            if step.connection not in runners:
                # Further connections use the TLS port the fixture also serves (imaps when plain is false).
                runners[step.connection] = TranscriptRunner(host, tls_port or port, context, variables, plain=False)
            runner = runners[step.connection]
            if step.kind == "C":
                runner.send(step)
            else:
                runner.expect(step)
    finally:
        for runner in runners.values():
            runner.close()


def all_scripts() -> list[Path]:
    return sorted(SCRIPTS.glob("*.txt"))
