"""The region's event log: one sealed object (kind 7, ``events``) per event, written
if-absent under a name that sorts in time order, never rewritten, never deleted by prune
(docs/format.md section 17). An event says who did what to which point or instance, when,
and with what result; it holds no key material and no data, and, being sealed with the
master key like a manifest, nothing of it but its time is visible to the storage provider."""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from regionvault.core.errors import IntegrityError, ObjectNotFound
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._store import Store, canonical_json
from regionvault.core.repository.model import Problem

__all__ = [
    "ACTIONS",
    "RESULTS",
    "Event",
    "EventAction",
    "EventResult",
    "check_events",
    "current_actor",
    "decode_event",
    "read_events",
    "write_event",
]

#: how long an event's error text may be (longer is cut, with "...")
MAX_ERROR = 2000
#: how many members an event's detail may hold, and how long a text in it may be
MAX_DETAIL = 32
MAX_DETAIL_TEXT = 1000


class EventAction:
    """The actions an event records (its ``action`` member)."""

    BACKUP = "backup"
    COPY = "copy"
    RESTORE = "restore"
    FORGET = "forget"
    PRUNE = "prune"
    RETENTION = "retention"
    VERIFY = "verify"
    LOCK = "lock"
    HOLD = "hold"
    RELEASE = "release"
    ROTATE_KEYS = "rotate-keys"
    DRILL = "drill"


class EventResult:
    """An event's ``result``: done, failed (with the error), or refused (a WORM lock, a
    legal hold or a check said no, and nothing was changed)."""

    OK = "ok"
    FAILED = "failed"
    REFUSED = "refused"


ACTIONS = frozenset(v for k, v in vars(EventAction).items() if k.isupper())
RESULTS = frozenset((EventResult.OK, EventResult.FAILED, EventResult.REFUSED))

#: the time of the last event this process wrote into each vault (by vault id): the next
#: is never earlier, so that a log's order (its names' order) is the order this process
#: recorded its events in, even when two fall in one microsecond or an injected clock
#: stands still
_LAST_AT: dict[str, datetime] = {}
_LAST_LOCK = threading.Lock()

DetailValue = str | int | bool | None | list[str] | list[int]


@dataclass(frozen=True)
class Event:
    """One entry of a region's event log, as stored (docs/format.md section 17)."""

    #: its object name (``events/<time>-<id>``)
    name: str
    at: datetime
    action: str
    #: ``user`` (user@host), ``host``, ``pid``, ``pid_ticks``, ``job`` (the job key, or
    #: None outside a job)
    who: Mapping[str, Any]
    #: the recovery point and the instance it is about (either may be None)
    point: str | None
    instance: str | None
    result: str
    error: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "at": self.at.isoformat(),
            "action": self.action,
            "who": dict(self.who),
            "subject": {"point": self.point, "instance": self.instance},
            "result": self.result,
            "error": self.error,
            "detail": dict(self.detail),
        }


def current_actor(job: str | None = None) -> dict[str, Any]:
    """Who this process is, for an event's ``who``: ``user@host``, the host, pid and start
    time (core/procs.py), and the job key when it runs a job."""
    me = ProcessIdentity.current()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's bare uid)
        user = f"uid{os.getuid()}"
    return {
        "user": f"{user}@{socket.gethostname()}",
        "host": me.host,
        "pid": me.pid,
        "pid_ticks": me.ticks,
        "job": job,
    }


def _check_detail(detail: Mapping[str, Any]) -> dict[str, DetailValue]:
    if len(detail) > MAX_DETAIL:
        raise ValueError(f"an event's detail holds at most {MAX_DETAIL} members")
    out: dict[str, DetailValue] = {}
    for key, value in detail.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"event detail key {key!r} is not a name")
        if isinstance(value, str):
            value = value if len(value) <= MAX_DETAIL_TEXT else value[:MAX_DETAIL_TEXT] + "..."
        elif isinstance(value, list | tuple):
            items = list(value)[:MAX_DETAIL]
            if not all(isinstance(v, str) for v in items) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in items
            ):
                raise ValueError(f"event detail {key!r}: a list of texts or of whole numbers")
            value = items
        elif value is not None and not isinstance(value, int | bool):
            # canonical JSON has no fractions (docs/format.md section 13): say seconds as
            # milliseconds
            raise ValueError(
                f"event detail {key!r} is a {type(value).__name__}: texts, whole numbers, "
                "true/false, null or lists only"
            )
        out[key] = value
    return out


def write_event(
    store: Store,
    action: str,
    *,
    at: datetime,
    who: Mapping[str, Any],
    point: str | None = None,
    instance: str | None = None,
    result: str = EventResult.OK,
    error: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> Event:
    """Seal and put one event, if-absent under a fresh name; ValueError names a bad field."""
    if action not in ACTIONS:
        raise ValueError(f"unknown event action {action!r} (one of {', '.join(sorted(ACTIONS))})")
    if result not in RESULTS:
        raise ValueError(f"unknown event result {result!r} (ok, failed or refused)")
    if at.tzinfo is None:
        raise ValueError("an event's time must be timezone-aware")
    at = _after_last(store.vault_id, at.astimezone(UTC))
    if error is not None and len(error) > MAX_ERROR:
        error = error[:MAX_ERROR] + "..."
    checked = _check_detail(detail or {})
    point, instance = _cut(point, "point"), _cut(instance, "instance")
    body = {
        "at": at.isoformat(),
        "action": action,
        "who": dict(who),
        "subject": {"point": point, "instance": instance},
        "result": result,
        "error": error,
        "detail": checked,
    }
    name = fmt.event_name(at, fmt.new_id())
    store.put_sealed(fmt.ObjectKind.EVENTS, name, canonical_json(body), if_absent=True)
    return Event(name, at, action, dict(who), point, instance, result, error, checked)


def _cut(value: str | None, what: str) -> str | None:
    """A subject's id as given (a failed restore records what it was asked for), at most
    :data:`MAX_DETAIL_TEXT` characters."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"an event's {what} is a {type(value).__name__}, not an id")
    if value is not None and len(value) > MAX_DETAIL_TEXT:
        return value[:MAX_DETAIL_TEXT] + "..."
    return value


def _after_last(vault_id: str, at: datetime) -> datetime:
    with _LAST_LOCK:
        last = _LAST_AT.get(vault_id)
        if last is not None and at <= last:
            at = last + timedelta(microseconds=1)
        _LAST_AT[vault_id] = at
    return at


def decode_event(name: str, body: bytes) -> Event:
    """An event from its opened body; IntegrityError naming ``name`` when it is not one."""
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        subject = doc.get("subject") or {}
        at = datetime.fromisoformat(doc["at"])
        if at.tzinfo is None:
            raise ValueError("its time has no offset")
        who, detail = doc.get("who") or {}, doc.get("detail") or {}
        if not isinstance(who, dict) or not isinstance(detail, dict):
            raise TypeError("who and detail must be objects")
        return Event(
            name=name,
            at=at,
            action=str(doc["action"]),
            who=who,
            point=subject.get("point"),
            instance=subject.get("instance"),
            result=str(doc["result"]),
            error=doc.get("error"),
            detail=detail,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(name, f"event is malformed ({exc})") from None


def _name_time(name: str) -> str:
    return name[len(fmt.EVENT_PREFIX) :].split("-", 1)[0]


def read_events(
    store: Store, since: datetime | None = None, problems: list[Problem] | None = None
) -> list[Event]:
    """The events at or after ``since`` (all by default), oldest first. An event that does
    not authenticate or parse raises IntegrityError naming it, or, with ``problems``, is
    added there and left out."""
    floor = None if since is None else since.astimezone(UTC).strftime(fmt.EVENT_TIME)
    names = sorted(info.name for info in store.vault.list(fmt.EVENT_PREFIX))
    events: list[Event] = []
    for name in names:
        if floor is not None and _name_time(name) < floor:
            continue
        try:
            event = decode_event(name, store.get_sealed(fmt.ObjectKind.EVENTS, name))
        except ObjectNotFound:
            continue
        except IntegrityError as exc:
            if problems is None:
                raise
            problems.append(Problem(exc.object_name, exc.reason))
            continue
        events.append(event)
    return events


def check_events(store: Store) -> tuple[int, list[Problem]]:
    """Authenticate every event object (verify): ``(events read, problems)``."""
    problems: list[Problem] = []
    events = read_events(store, problems=problems)
    return len(events), problems
