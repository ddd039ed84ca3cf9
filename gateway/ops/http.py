"""The metrics listener: ``/metrics`` (Prometheus text format), ``/health`` and ``/ready``, plain HTTP on
``metrics.host:metrics.port`` (loopback by default; nothing on it names a person or a message)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from gateway.config import MetricsSettings
from gateway.ops.metrics import REGISTRY, LiveCollector
from gateway.storage.db import Database

log = logging.getLogger("gateway.metrics")


@dataclass
class Readiness:
    """Ready once every listener accepts connections; not ready again once SIGTERM arrived."""

    listening: bool = False
    stopping: bool = False
    collector: LiveCollector | None = None


class MetricsListener:
    def __init__(self, settings: MetricsSettings, db: Database, readiness: Readiness) -> None:
        self.settings = settings
        self.db = db
        self.readiness = readiness
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, reuse_address=True)
        await site.start()
        server = site._server  # noqa: SLF001  (aiohttp keeps the bound socket there; port 0 means chosen now)
        sockets = getattr(server, "sockets", None) or []
        self.address = tuple(sockets[0].getsockname()[:2]) if sockets else (self.settings.host, self.settings.port)
        log.info("metrics listening on %s:%d (/metrics, /health, /ready)", *self.address)

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        collector = self.readiness.collector
        if collector is not None:
            try:
                await collector.refresh()
            except Exception as error:  # noqa: BLE001  (a scrape answers with what it has; the error is logged)
                log.warning("metrics: database values not refreshed: %s", error)
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _request: web.Request) -> web.Response:
        """Alive: the event loop answers (a hung loop would not)."""
        return web.json_response({"status": "ok"})

    async def _ready(self, _request: web.Request) -> web.Response:
        """Ready to take traffic: listening, not stopping, and the database answers."""
        if self.readiness.stopping:
            return web.json_response({"status": "stopping"}, status=503)
        if not self.readiness.listening:
            return web.json_response({"status": "starting"}, status=503)
        try:
            async with self.db.session() as session:
                await session.execute(text("SELECT 1"))
        except Exception as error:  # noqa: BLE001  (not ready: say why, keep serving the probe)
            return web.json_response({"status": "database unavailable", "detail": type(error).__name__}, status=503)
        return web.json_response({"status": "ready"})
