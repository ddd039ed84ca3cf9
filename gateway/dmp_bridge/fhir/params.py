"""ITI-67 search parameters and the update bodies (PUT resource, PATCH JSON Patch), parsed and checked.

Search (IHE MHD ITI-67, FHIR R4 search): ``patient.identifier`` (required:
``system|value``, system ``urn:oid:<INS OID>`` or the bare OID, or a bare
value for any INS OID), ``type`` and ``category`` (tokens, comma = OR),
``date`` (repeatable, prefixes eq/ge/le/gt/lt, a date or a dateTime),
``status`` (current by default; superseded versions only when asked),
``_count`` and ``_offset`` (paging, the ``next`` link carries it).

Update (PDSm st_maj): only status, securityLabel and the isArchived extension
may change. A PUT whose other elements differ from the stored resource, or a
PATCH touching any other path, is refused with 405.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from gateway.directory.identifiers import IdentifierError, validate_nir
from gateway.dmp_bridge.fhir.resources import IS_ARCHIVED_URL
from gateway.dmp_bridge.fhir.service import DateBound, InvalidRequest, MetadataChange, SearchQuery, Token, known_ins_oid
from gateway.dmp_bridge.tables import DocumentStatus

DATE_PREFIXES = ("eq", "ge", "le", "gt", "lt")
DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
UPDATABLE = ("status", "securityLabel", "extension")
IGNORED_ON_UPDATE = ("meta", "text")


class MethodNotAllowed(Exception):
    """An update touching an element PDSm does not let change: 405."""


def search_query(params: Mapping[str, str], multi: Mapping[str, list[str]], *, page_size: int,
                 max_page_size: int) -> SearchQuery:
    ins, oid = _patient(params.get("patient.identifier"))
    statuses = _statuses(params.get("status"))
    return SearchQuery(
        patient_ins=ins, patient_oid=oid, types=_tokens(params.get("type")), categories=_tokens(params.get("category")),
        dates=tuple(bound for value in multi.get("date", []) for bound in _date_bounds(value)),
        statuses=frozenset(statuses), count=_bounded_int(params.get("_count"), page_size, 1, max_page_size, "_count"),
        offset=_bounded_int(params.get("_offset"), 0, 0, 10**9, "_offset"))


def _patient(value: str | None) -> tuple[str, str | None]:
    if not value or not value.strip():
        raise InvalidRequest("patient.identifier is required (system|INS, e.g. urn:oid:1.2.250.1.213.1.4.10|...)",
                             field="patient.identifier")
    system, separator, ins = value.strip().rpartition("|")
    if not separator:
        return _ins(ins), None
    oid = known_ins_oid(system)
    # An identifier system that is no INS OID names nobody: an empty search, not an error.
    return (_ins(ins), oid) if oid is not None else (ins.upper(), system)


def _ins(value: str) -> str:
    try:
        return validate_nir(value, field="patient.identifier")
    except IdentifierError as error:
        raise InvalidRequest(str(error), field="patient.identifier") from None


def _statuses(value: str | None) -> list[str]:
    statuses = _csv(value) or [DocumentStatus.CURRENT.value]
    known = {status.value for status in DocumentStatus}
    unknown = [status for status in statuses if status not in known]
    if unknown:
        raise InvalidRequest(f"status must be {' or '.join(sorted(known))}", field="status")
    return statuses


def _csv(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _tokens(value: str | None) -> tuple[Token, ...]:
    tokens = []
    for part in _csv(value):
        system, separator, code = part.rpartition("|")
        tokens.append(Token(system or None, code) if separator else Token(None, part))
    return tuple(tokens)


def _date_bounds(value: str) -> list[DateBound]:
    prefix, text = (value[:2], value[2:]) if value[:2] in DATE_PREFIXES else ("eq", value)
    start = _parse_moment(text)
    if not DATE_ONLY.match(text):
        return [DateBound(prefix, start)]
    end = start + dt.timedelta(days=1)  # a date means the whole day (FHIR search on dates: implicit range)
    by_prefix = {"eq": [DateBound("ge", start), DateBound("lt", end)], "ge": [DateBound("ge", start)],
                 "gt": [DateBound("ge", end)], "lt": [DateBound("lt", start)], "le": [DateBound("lt", end)]}
    return by_prefix[prefix]


def _parse_moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{text!r} is not a FHIR date or dateTime", field="date") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _bounded_int(value: str | None, default: int, low: int, high: int, field: str) -> int:
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()):
        raise InvalidRequest(f"{field} must be a whole number", field=field)
    return max(low, min(int(value), high))


# ------------------------------------------------------------------------------------ updates


def change_from_resource(current: dict[str, Any], submitted: Any, resource_id: str) -> MetadataChange:
    """A PUT body: the stored resource with only status, securityLabel or isArchived changed."""
    if not isinstance(submitted, dict) or submitted.get("resourceType") != "DocumentReference":
        raise InvalidRequest("the body must be a DocumentReference", field="resourceType")
    if str(submitted.get("id", "")) != resource_id:
        raise InvalidRequest("the resource id must match the URL (FHIR update)", field="id")
    if _fixed_part(current) != _fixed_part(submitted):
        raise MethodNotAllowed("only status, securityLabel and the isArchived extension may be updated (PDSm)")
    return MetadataChange(
        status=_changed(current.get("status"), submitted.get("status")),
        security_labels=_changed_labels(current, submitted),
        archived=_changed(_archived(current), _archived(submitted)))


def change_from_patch(current: dict[str, Any], operations: Any, resource_id: str) -> MetadataChange:
    """A JSON Patch (RFC 6902) limited to /status, /securityLabel and /extension; applied, then as a PUT."""
    if not isinstance(operations, list):
        raise InvalidRequest("a JSON Patch body is an array of operations", field="patch")
    patched = copy.deepcopy(current)
    for operation in operations:
        _apply_operation(patched, operation)
    return change_from_resource(current, patched, resource_id)


def _fixed_part(resource: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in resource.items() if key not in UPDATABLE + IGNORED_ON_UPDATE}


def _changed(before: Any, after: Any) -> Any:
    return after if after != before else None


def _labels(resource: dict[str, Any]) -> tuple[str, ...]:
    labels = resource.get("securityLabel") or []
    if not isinstance(labels, list):
        raise InvalidRequest("securityLabel is a list of CodeableConcepts", field="securityLabel")
    return tuple(str(coding.get("code")) for label in labels if isinstance(label, dict)
                 for coding in label.get("coding") or [] if isinstance(coding, dict) and coding.get("code"))


def _changed_labels(current: dict[str, Any], submitted: dict[str, Any]) -> tuple[str, ...] | None:
    before, after = _labels(current), _labels(submitted)
    return after if set(after) != set(before) else None


def _archived(resource: dict[str, Any]) -> bool:
    extensions = resource.get("extension") or []
    if not isinstance(extensions, list):
        raise InvalidRequest("extension is a list", field="extension")
    others = [e for e in extensions if not isinstance(e, dict) or e.get("url") != IS_ARCHIVED_URL]
    if others:
        raise MethodNotAllowed("only the isArchived extension may be updated (PDSm)")
    values = [e.get("valueBoolean") for e in extensions]
    if any(not isinstance(value, bool) for value in values):
        raise InvalidRequest("isArchived carries valueBoolean", field="extension")
    return bool(values and values[0])


def _apply_operation(document: dict[str, Any], operation: Any) -> None:
    if not isinstance(operation, dict) or operation.get("op") not in ("add", "remove", "replace", "test"):
        raise InvalidRequest("each JSON Patch operation has op add, remove, replace or test", field="patch")
    path = _pointer(operation.get("path"))
    if path[0] not in UPDATABLE:
        raise MethodNotAllowed(f"/{'/'.join(path)} cannot be updated: only status, securityLabel and isArchived (PDSm)")
    parent, key = _walk(document, path)
    _perform(parent, key, operation)


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise InvalidRequest("a JSON Patch path is a JSON Pointer (RFC 6901)", field="patch")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(document: dict[str, Any], path: list[str]) -> tuple[Any, str]:
    target: Any = document
    for part in path[:-1]:
        target = _child(target, part)
    return target, path[-1]


def _child(container: Any, key: str) -> Any:
    try:
        return container[int(key)] if isinstance(container, list) else container[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise InvalidRequest(f"JSON Patch path element {key!r} does not exist", field="patch") from None


def _perform(parent: Any, key: str, operation: dict[str, Any]) -> None:
    op, value = operation["op"], operation.get("value")
    if op == "test":
        if _child(parent, key) != value:
            raise InvalidRequest("JSON Patch test failed", field="patch")
    elif isinstance(parent, list):
        _perform_on_list(parent, key, op, value)
    elif isinstance(parent, dict):
        if op == "remove":
            _child(parent, key)
            del parent[key]
        else:
            if op == "replace":
                _child(parent, key)
            parent[key] = value
    else:
        raise InvalidRequest("JSON Patch path goes through a value", field="patch")


def _perform_on_list(parent: list[Any], key: str, op: str, value: Any) -> None:
    if op == "add" and key == "-":
        parent.append(value)
        return
    _child(parent, key)
    index = int(key)
    if op == "add":
        parent.insert(index, value)
    elif op == "remove":
        parent.pop(index)
    else:
        parent[index] = value
