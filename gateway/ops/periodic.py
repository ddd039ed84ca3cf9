"""The background passes ``gateway serve`` repeats (crypto-shredding, purges, access notices): one loop.

A pass that raises is logged and the next one still comes: a database hiccup must not end the task.
Passes that must run on one node at a time take their advisory lock themselves (storage/advisory.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)


class PeriodicTask(ABC):
    """Runs ``run_once`` at start, then every ``interval_seconds`` or sooner when woken."""

    name: str   # the asyncio task's name and the log's word for the pass

    def __init__(self, *, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @abstractmethod
    async def run_once(self) -> object:
        """One pass."""

    def wake(self) -> None:
        """Run the next pass now rather than at the end of the interval."""
        self._woken.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            self._woken.clear()
            try:
                await self.run_once()
            except Exception:
                log.exception("%s pass failed; next pass in %s s", self.name, self.interval)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout=self.interval)
