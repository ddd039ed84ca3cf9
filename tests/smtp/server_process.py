"""Run the test gateway as a separate process, for measurements a thread cannot give
(its own RSS) and for crashes (SIGKILL). ``ServerProcess.start()`` waits for
``<data_dir>/smtp-ready.json`` written by ``python -m tests.smtp.gateway_thread``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    data_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready_file = self.data_dir / "smtp-ready.json"
        ready_file.unlink(missing_ok=True)
        env = dict(os.environ, GATEWAY_TEST_OVERRIDES=json.dumps(self.overrides))
        log = open(self.data_dir / "server.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.smtp.gateway_thread", str(self.data_dir)],
                                        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready_file.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"test gateway exited {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"test gateway not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)
        self.ready = json.loads(ready_file.read_text())
        return self

    def port(self, kind: str) -> int:
        return int(self.ready["ports"][kind])

    def account(self, type_: str, index: int = 0) -> dict[str, Any]:
        return [a for a in self.ready["accounts"] if a["type"] == type_][index]

    @property
    def ca_file(self) -> str:
        return str(self.ready["extra"]["ca_file"])

    def memory_kib(self, field_name: str = "VmHWM") -> int:
        """VmRSS (now) or VmHWM (peak) of the server process, from /proc."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise AssertionError(f"{field_name} not in /proc/{self.process.pid}/status")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(60)

    def log_tail(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""
