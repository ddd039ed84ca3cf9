"""How ``gateway serve`` logs: one human-readable line per event, or one JSON object per line
(``log_format = "json"``) for a log collector.

Log lines carry identifiers (queue ids, addresses, doors, codes), never a message body, a document, a
document title or a password: the code logs no such thing, and aiosmtpd's own logger (``mail.log``), whose
DEBUG lines would echo what clients send, never goes below INFO.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
QUIET_BELOW_INFO = ("mail.log",)   # third-party loggers whose DEBUG output echoes protocol input


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message, and the
    exception (its type and traceback as one escaped string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Root handler on stderr in the chosen format; aiosmtpd's logger floored at INFO."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    _record_only_what_is_shown()
    for name in QUIET_BELOW_INFO:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))


def _record_only_what_is_shown() -> None:
    """Neither format shows where a call was made, nor the thread, process or task: the logging module then
    need not look them up for every record (its documented optimisations; the source file lookup walks
    the stack, the costliest part of a record)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):     # Python 3.12+
        logging.logAsyncioTasks = False
