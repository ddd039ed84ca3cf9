"""Dates in IMAP (RFC 3501 9): ``date`` for SEARCH, ``date-time`` for APPEND and INTERNALDATE."""

from __future__ import annotations

import datetime as dt
import re

from gateway.imap.protocol.primitives import Buffer, fail

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {name.upper().encode(): index + 1 for index, name in enumerate(MONTHS)}

# date-text = date-day "-" date-month "-" date-year; date = date-text / DQUOTE date-text DQUOTE
_DATE = re.compile(rb'("?)([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\1')
# date-time = DQUOTE date-day-fixed "-" date-month "-" date-year SP time SP zone DQUOTE
_DATE_TIME = re.compile(
    rb'"( ?[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"')


def _month(name: bytes, buf: Buffer) -> int:
    month = _MONTH_NUMBER.get(name.upper())
    if month is None:
        raise fail("Invalid month", buf)
    return month


def parse_date(buf: Buffer) -> tuple[dt.date, Buffer]:
    """RFC 3501 9 ``date``: d-Mon-yyyy, optionally quoted."""
    match = _DATE.match(buf)
    if match is None:
        raise fail("Expected a date (d-Mon-yyyy)", buf)
    try:
        value = dt.date(int(match.group(4)), _month(match.group(3), buf), int(match.group(2)))
    except ValueError:
        raise fail("Invalid date", buf) from None
    return value, buf[match.end():]


def parse_date_time(buf: Buffer) -> tuple[dt.datetime, Buffer]:
    """RFC 3501 9 ``date-time``: "dd-Mon-yyyy hh:mm:ss +zzzz", an aware datetime."""
    match = _DATE_TIME.match(buf)
    if match is None:
        raise fail("Expected a date-time", buf)
    day, month, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
    offset = dt.timedelta(hours=int(zone_h), minutes=int(zone_m))
    if int(zone_m) >= 60 or offset >= dt.timedelta(hours=24):
        raise fail("Invalid time zone", buf)
    try:
        zone = dt.timezone(-offset if sign == b"-" else offset)
        value = dt.datetime(int(year), _month(month, buf), int(day), int(hour), int(minute),
                            int(second), tzinfo=zone)
    except ValueError:
        raise fail("Invalid date-time", buf) from None
    return value, buf[match.end():]


def format_date(value: dt.date) -> str:
    return f"{value.day}-{MONTHS[value.month - 1]}-{value.year:04d}"


def format_date_time(value: dt.datetime) -> str:
    """RFC 3501 9 date-time with date-day-fixed (space-padded day), quotes included."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    offset = value.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    zone = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return (f'"{value.day:2d}-{MONTHS[value.month - 1]}-{value.year:04d} '
            f'{value.hour:02d}:{value.minute:02d}:{value.second:02d} {zone}"')
