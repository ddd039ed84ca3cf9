"""Prometheus metrics (``prometheus_client``), served with /health and /ready on a port of their own.

The counters and histograms are declared here once, on this module's registry (the Prometheus idiom: like a
logger, a metric is named where it is declared, and the code that counts imports it). Values read at scrape
time (queue depth and age, filings by outcome, open connections, outbound totals) come from a
``LiveCollector`` that ``gateway serve`` registers for its run. Label values are fixed words (a door, a
command verb, an outcome): never an address, a subject or anything from a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from gateway.storage.db import Database

log = logging.getLogger("gateway.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter("gateway_connections", "Connections accepted, by listener", ["listener"], registry=REGISTRY)
MESSAGES_ACCEPTED = Counter("gateway_messages_accepted", "Messages acknowledged (250 after the queue commit), by door",
                            ["door"], registry=REGISTRY)
LOCAL_DELIVERIES = Counter("gateway_local_deliveries", "Local deliveries to a mailbox, by outcome "
                           "(delivered, deferred, bounced)", ["outcome"], registry=REGISTRY)
AUTH_FAILURES = Counter("gateway_authentication_failures", "Failed or throttled sign-ins, by door", ["door"],
                        registry=REGISTRY)
COMMAND_SECONDS = Histogram("gateway_command_seconds", "Time to run one protocol command, by protocol and verb",
                            ["protocol", "command"], registry=REGISTRY,
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))

SMTP_VERBS = frozenset({"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY"})
IMAP_VERBS = frozenset({
    "CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "AUTHENTICATE", "LOGIN", "SELECT", "EXAMINE", "CREATE", "DELETE",
    "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB", "STATUS", "APPEND", "CHECK", "CLOSE", "EXPUNGE", "SEARCH",
    "FETCH", "STORE", "COPY", "MOVE", "UID", "IDLE", "NAMESPACE", "ID", "ENABLE", "UNSELECT", "GETQUOTA",
    "GETQUOTAROOT", "GETACL", "MYRIGHTS", "LISTRIGHTS",
})


def verb_label(verb: str, known: frozenset[str]) -> str:
    """A command verb as a label: one of the protocol's words, else "other" (a label never carries input)."""
    upper = verb.upper()
    return upper if upper in known else "other"


class CountedFailures:
    """A sign-in failure sink (``FailureAudit``) that counts each failure by door, then hands it on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def failed(self, door: str, login: str, source: str, reason: str) -> None:
        AUTH_FAILURES.labels(door).inc()
        await self.inner.failed(door, login, source, reason)


class _Timed:
    """``with timed(...)``: the command's time observed when the block ends, however it ends."""

    __slots__ = ("_histogram", "_started")

    def __init__(self, histogram: Any) -> None:
        self._histogram = histogram
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, *_exc: object) -> None:
        self._histogram.observe(time.perf_counter() - self._started)


# The histogram's child per (protocol, verb): ``labels()`` looks it up under a lock at every call, and this
# runs for every command. Verbs are fixed words (``verb_label``), so the dict stays small.
_COMMAND_CHILDREN: dict[tuple[str, str], Any] = {}


def timed(protocol: str, command: str) -> _Timed:
    child = _COMMAND_CHILDREN.get((protocol, command))
    if child is None:
        child = _COMMAND_CHILDREN[(protocol, command)] = COMMAND_SECONDS.labels(protocol, command)
    return _Timed(child)


@dataclass
class LiveValues:
    """What the collector reads at scrape time, refreshed from the database just before (``refresh``)."""

    queue_depth: dict[str, int] = field(default_factory=dict)     # route -> recipients not delivered or failed yet
    oldest_age_seconds: float = 0.0
    filings: dict[str, int] = field(default_factory=dict)          # outcome -> documents
    filing_jobs: dict[str, int] = field(default_factory=dict)      # state -> jobs


class LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: the queue and filings (from the database, via ``refresh``),
    open connections and the outbound worker's totals (from the running objects)."""

    def __init__(self, db: Database, *, open_connections: dict[str, Callable[[], int]],
                 outbound_totals: Callable[[], dict[str, int]] | None = None) -> None:
        self.db = db
        self.open_connections = open_connections
        self.outbound_totals = outbound_totals
        self.values = LiveValues()

    async def refresh(self) -> None:
        from gateway.dmp_bridge.tables import FilingJob, FilingOutcome
        from gateway.queue.store import QueueStore

        backlog = await QueueStore(self.db).backlog()
        async with self.db.session() as session:
            filings = dict((await session.execute(
                select(FilingOutcome.outcome, func.count()).group_by(FilingOutcome.outcome))).all())
            jobs = dict((await session.execute(
                select(FilingJob.state, func.count()).group_by(FilingJob.state))).all())
        depth, age = backlog.by_route(), backlog.oldest_seconds or 0.0
        self.values = LiveValues({str(k): int(v) for k, v in depth.items()}, age,
                                 {str(k): int(v) for k, v in filings.items()}, {str(k): int(v) for k, v in jobs.items()})

    def collect(self) -> Iterable[Any]:
        values = self.values
        depth = GaugeMetricFamily("gateway_queue_depth", "Recipients waiting for delivery (pending or deferred), by route",
                                  labels=["route"])
        for route in ("local", "remote"):
            depth.add_metric([route], values.queue_depth.get(route, 0))
        yield depth
        yield GaugeMetricFamily("gateway_queue_oldest_age_seconds", "Age of the oldest message still waiting",
                                value=values.oldest_age_seconds)
        filings = GaugeMetricFamily("gateway_filing_outcomes", "Documents by filing outcome (filing_outcomes rows)",
                                    labels=["outcome"])
        for outcome, count in sorted(values.filings.items()):
            filings.add_metric([outcome], count)
        yield filings
        jobs = GaugeMetricFamily("gateway_filing_jobs", "Filing jobs by state", labels=["state"])
        for state, count in sorted(values.filing_jobs.items()):
            jobs.add_metric([state], count)
        yield jobs
        open_now = GaugeMetricFamily("gateway_connections_open", "Connections open now, by protocol", labels=["protocol"])
        for protocol, counter in self.open_connections.items():
            open_now.add_metric([protocol], counter())
        yield open_now
        if self.outbound_totals is not None:
            outbound = CounterMetricFamily("gateway_outbound_recipients", "Recipients handed to other operators by "
                                           "this process, by outcome (delivered, deferred, bounced)", labels=["outcome"])
            for outcome, count in self.outbound_totals().items():
                outbound.add_metric([outcome], count)
            yield outbound
