"""The region's event log: one sealed object (kind 7, ``events``) per event, named by its
sequence number (``events/<seq as 16 hex digits>``), written if-absent, never rewritten,
never deleted by prune (docs/format.md section 17). Each body carries its ``seq`` and the
BLAKE3 of the previous event's sealed bytes (``prev``): a chain, so a deleted or replaced
event shows as a gap or a break naming the missing numbers. Where the vault has WORM, each
event is locked (governance mode, :data:`EVENT_RETAIN`) as it is written, so deleting one is
refused too. An event says who did what to which point or instance, when (the writer's
clock, as data: order is ``seq``), and with what result; it holds no key material and no
data, and its body is padded to a multiple of :data:`EVENT_PAD` bytes before it is sealed
like a manifest, so that a storage provider sees neither its content nor its kind."""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import blake3
from regionvault.core.errors import (
    IntegrityError,
    ObjectExists,
    ObjectNotFound,
    RegionVaultError,
)
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import _crypto
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._store import Store, canonical_json
from regionvault.core.repository.model import Problem
from regionvault.core.types import RetentionMode

__all__ = [
    "ACTIONS",
    "EVENT_PAD",
    "EVENT_RETAIN",
    "RESULTS",
    "Event",
    "EventAction",
    "EventError",
    "EventLog",
    "EventResult",
    "check_events",
    "current_actor",
    "decode_event",
    "event_seq_name",
    "read_event_log",
    "read_events",
    "write_event",
]

#: an event's name: its sequence number as 16 lower-case hex digits
SEQ_DIGITS = 16
#: an event body is padded to a multiple of this many bytes before it is sealed
EVENT_PAD = 256
#: where the vault has WORM, each event is locked this long (governance mode) when written
EVENT_RETAIN = timedelta(days=400)
EVENT_RETAIN_MODE = RetentionMode.GOVERNANCE
#: how many taken sequence numbers a writer steps over before it gives up
MAX_RACE = 100

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

#: the last event this process wrote into each vault (by vault id, kept only for the vault
#: object it went through: a copy of the vault elsewhere has the same id): that object, the
#: event's sequence number and the BLAKE3 of its sealed bytes; the next write tries the
#: number after it, and lists the log only when it knows none or that number is taken
_TAIL: dict[str, tuple[weakref.ref[Any], int, str]] = {}
_TAIL_LOCK = threading.Lock()


class EventError(RegionVaultError, ValueError):
    """An event that cannot be recorded as given (an unknown action, a bad detail), or a log
    whose next number could not be taken."""


DetailValue = str | int | bool | None | list[str] | list[int]


@dataclass(frozen=True)
class Event:
    """One entry of a region's event log, as stored (docs/format.md section 17)."""

    #: its object name (``events/<seq as 16 hex digits>``)
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
    #: its place in the log (0 first), and the BLAKE3 (hex) of the previous event's sealed
    #: bytes (None for the first)
    seq: int = -1
    prev: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seq": self.seq,
            "prev": self.prev,
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
        raise EventError(f"an event's detail holds at most {MAX_DETAIL} members")
    out: dict[str, DetailValue] = {}
    for key, value in detail.items():
        if not isinstance(key, str) or not key:
            raise EventError(f"event detail key {key!r} is not a name")
        if isinstance(value, str):
            value = value if len(value) <= MAX_DETAIL_TEXT else value[:MAX_DETAIL_TEXT] + "..."
        elif isinstance(value, list | tuple):
            items = list(value)[:MAX_DETAIL]
            if not all(isinstance(v, str) for v in items) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in items
            ):
                raise EventError(f"event detail {key!r}: a list of texts or of whole numbers")
            value = items
        elif value is not None and not isinstance(value, int | bool):
            # canonical JSON has no fractions (docs/format.md section 13): say seconds as
            # milliseconds
            raise EventError(
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
        raise EventError(f"unknown event action {action!r} (one of {', '.join(sorted(ACTIONS))})")
    if result not in RESULTS:
        raise EventError(f"unknown event result {result!r} (ok, failed or refused)")
    if at.tzinfo is None:
        raise EventError("an event's time must be timezone-aware")
    at = at.astimezone(UTC)
    if error is not None and len(error) > MAX_ERROR:
        error = error[:MAX_ERROR] + "..."
    checked = _check_detail(detail or {})
    point, instance = _cut(point, "point"), _cut(instance, "instance")
    body: dict[str, Any] = {
        "at": at.isoformat(),
        "action": action,
        "who": dict(who),
        "subject": {"point": point, "instance": instance},
        "result": result,
        "error": error,
        "detail": checked,
    }
    with _TAIL_LOCK:  # one process writes its events in the order it recorded them
        seq, prev = _cached_tail(store) or _read_tail(store)
        for _ in range(MAX_RACE):
            seq += 1
            name = event_seq_name(seq)
            padded = _padded({**body, "seq": seq, "prev": prev})
            # not compressed: the padding must survive into the object's size
            sealed = _crypto.seal(
                vault_id=store.vault_id,
                kind=fmt.ObjectKind.EVENTS,
                name=name,
                body=padded,
                secret=store.config.master_key,
                compress_level=None,
            )
            try:
                store.vault.put(name, sealed, if_absent=True)
            except ObjectExists:
                # another writer took it: the log's tail, as it stands now, and the next
                seq, prev = _read_tail(store, seq)
                continue
            break
        else:
            raise EventError(f"{store.vault_id}: no free event number after {MAX_RACE} tries")
        _TAIL[store.vault_id] = (weakref.ref(store.vault), seq, _digest(sealed))
    if store.vault.capabilities.worm_lock:
        # from the later of the writer's and this host's clock: a lock never starts past
        try:
            store.vault.set_retention(
                name, max(at, datetime.now(UTC)) + EVENT_RETAIN, EVENT_RETAIN_MODE
            )
        except RegionVaultError as exc:
            raise EventError(f"{name} was written but could not be WORM-locked: {exc}") from exc
    return Event(name, at, action, dict(who), point, instance, result, error, checked, seq, prev)


def _cached_tail(store: Store) -> tuple[int, str | None] | None:
    """What this process wrote last into this very vault object: another object with the
    same vault id (a copy of the vault elsewhere) must list its own log."""
    found = _TAIL.get(store.vault_id)
    if found is None or found[0]() is not store.vault:
        return None
    return found[1], found[2]


def event_seq_name(seq: int) -> str:
    """``events/<seq as 16 hex digits>``: a listing is the log in order."""
    if not 0 <= seq < 16**SEQ_DIGITS:
        raise EventError(f"event sequence number {seq} is out of range")
    return f"{fmt.EVENT_PREFIX}{seq:0{SEQ_DIGITS}x}"


def _seq_of(name: str) -> int | None:
    tail = name[len(fmt.EVENT_PREFIX) :]
    if len(tail) != SEQ_DIGITS or tail.strip("0123456789abcdef"):
        return None
    return int(tail, 16)


def _digest(sealed: bytes) -> str:
    return blake3.blake3(sealed).hexdigest()


def _padded(body: dict[str, Any]) -> bytes:
    """Canonical JSON of ``body`` with a ``pad`` member of spaces that makes its length a
    multiple of :data:`EVENT_PAD`."""
    bare = canonical_json({**body, "pad": ""})
    return canonical_json({**body, "pad": " " * (-len(bare) % EVENT_PAD)})


#: event names that share all but their last 3 hex digits: one listing prefix
_BLOCK = 16**3


def _read_tail(store: Store, taken: int | None = None) -> tuple[int, str | None]:
    """The last event's number and digest as the vault lists it now ((-1, None): empty).
    With ``taken`` (a number known to exist), only the names from its block of
    :data:`_BLOCK` on are listed, block by block until one is empty."""
    if taken is None:
        numbered = _listed(store)[0]
        if not numbered:
            return -1, None
        seq, name = numbered[-1]
        return seq, _digest(store.vault.get(name))
    last = (taken, event_seq_name(taken))
    block = taken // _BLOCK
    width = SEQ_DIGITS - 3
    while block < 16**width:  # ends at the first empty block: the log's end
        listed = [
            (n, info.name)
            for info in store.vault.list(f"{fmt.EVENT_PREFIX}{block:0{width}x}")
            if (n := _seq_of(info.name)) is not None
        ]
        if not listed:
            break
        last = max(last, *listed)
        block += 1
    return last[0], _digest(store.vault.get(last[1]))


def _listed(store: Store) -> tuple[list[tuple[int, str]], list[str]]:
    """The log's ``(seq, name)`` in order, and names under ``events/`` that are no event's."""
    numbered: list[tuple[int, str]] = []
    strays: list[str] = []
    for info in store.vault.list(fmt.EVENT_PREFIX):
        seq = _seq_of(info.name)
        if seq is None:
            strays.append(info.name)
        else:
            numbered.append((seq, info.name))
    numbered.sort()
    return numbered, strays


def _cut(value: str | None, what: str) -> str | None:
    """A subject's id as given (a failed restore records what it was asked for), at most
    :data:`MAX_DETAIL_TEXT` characters."""
    if value is not None and not isinstance(value, str):
        raise EventError(f"an event's {what} is a {type(value).__name__}, not an id")
    if value is not None and len(value) > MAX_DETAIL_TEXT:
        return value[:MAX_DETAIL_TEXT] + "..."
    return value


def decode_event(name: str, body: bytes) -> Event:
    """An event from its opened body; IntegrityError naming ``name`` when it is not one."""
    try:
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        subject = doc.get("subject") or {}
        at = datetime.fromisoformat(doc["at"])
        if at.tzinfo is None:
            raise EventError("its time has no offset")
        who, detail = doc.get("who") or {}, doc.get("detail") or {}
        if not isinstance(who, dict) or not isinstance(detail, dict):
            raise TypeError("who and detail must be objects")
        seq, prev = doc["seq"], doc.get("prev")
        if not isinstance(seq, int) or seq != _seq_of(name):
            raise ValueError(f"its seq {seq!r} is not its name's")
        if prev is not None and not isinstance(prev, str):
            raise TypeError("prev must be a text")
        return Event(
            seq=seq,
            prev=prev,
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


def _missing(first: int, last: int) -> str:
    return f"event {first}" if first == last else f"events {first} to {last}"


@dataclass
class EventLog:
    """A region's event log as read: its events in ``seq`` order, the problems found (an
    event that does not authenticate, a gap, a broken chain: each named), and what reading
    cost."""

    events: list[Event]
    problems: list[Problem]
    #: events in the log (the listing), and event objects fetched to read it
    listed: int = 0
    fetched: int = 0
    #: the first sequence number read (the log's first, or the first at/after ``since``)
    first_seq: int | None = None


def read_event_log(store: Store, since: datetime | None = None) -> EventLog:
    """The events from the first whose ``at`` is at or after ``since`` (found by a bisection
    of the numbered listing: about log2(n) events fetched), or all, in ``seq`` order, with
    the problems found: an event that does not authenticate or parse, a number missing
    (deleted), an event whose ``prev`` is not the digest of the one before (replaced), and
    names under ``events/`` that are not event names. A deleted *tail* shows no gap: only
    WORM (section 17) keeps it."""
    numbered, strays = _listed(store)
    log = EventLog([], [Problem(n, "not an event name (events/<16 hex digits>)") for n in strays])
    log.listed = len(numbered)
    fetched: dict[int, bytes | None] = {}
    opened: dict[int, Event | IntegrityError] = {}

    def raw(i: int) -> bytes | None:
        if i not in fetched:
            log.fetched += 1
            try:
                fetched[i] = store.vault.get(numbered[i][1])
            except ObjectNotFound:  # deleted since the listing: a gap like any other
                fetched[i] = None
        return fetched[i]

    def event(i: int) -> Event | IntegrityError | None:
        data = raw(i)
        if data is None:
            return None
        if i not in opened:
            name = numbered[i][1]
            try:
                opened[i] = decode_event(name, store.open_sealed(fmt.ObjectKind.EVENTS, name, data))
            except IntegrityError as exc:
                opened[i] = exc
        return opened[i]

    start = 0
    if since is not None:
        floor = since.astimezone(UTC)
        lo, hi = 0, len(numbered)
        while lo < hi:  # at most log2(n)+1 steps; `at` is the writers' clocks, nearly ordered
            mid = (lo + hi) // 2
            found = event(mid)
            if isinstance(found, Event) and found.at < floor:
                lo = mid + 1
            else:
                hi = mid
        start = lo
    if start < len(numbered):
        log.first_seq = numbered[start][0]
    expected = 0
    prev_digest: str | None = None
    if start > 0:  # the one before the first read: to check the first read's link
        expected = numbered[start - 1][0] + 1
        before = raw(start - 1)
        prev_digest = None if before is None else _digest(before)
    for i in range(start, len(numbered)):
        seq, name = numbered[i]
        if seq > expected:
            log.problems.append(
                Problem(name, f"{_missing(expected, seq - 1)} of the log missing (deleted?)")
            )
            prev_digest = None  # the link across a gap cannot be checked
        data = raw(i)
        found = event(i)
        if data is None:
            log.problems.append(Problem(name, f"event {seq} missing (deleted while read)"))
            prev_digest, expected = None, seq + 1
            continue
        if isinstance(found, IntegrityError):
            log.problems.append(Problem(found.object_name, found.reason))
        elif found is not None:
            if seq == expected and found.prev != prev_digest and (prev_digest or seq == 0):
                log.problems.append(
                    Problem(
                        name,
                        f"event {seq}'s prev is not event {seq - 1}'s digest "
                        "(the one before it was replaced)",
                    )
                )
            log.events.append(found)
        # after a damaged event (named already) the next link is not checked
        prev_digest = _digest(data) if isinstance(found, Event) else None
        expected = seq + 1
    return log


def read_events(
    store: Store, since: datetime | None = None, problems: list[Problem] | None = None
) -> list[Event]:
    """The events from the first at or after ``since`` (all by default), in ``seq`` order.
    An event that does not authenticate or parse, a gap or a broken chain raises
    IntegrityError naming it, or, with ``problems``, is added there (and a bad event left
    out)."""
    log = read_event_log(store, since)
    if log.problems and problems is None:
        first = log.problems[0]
        raise IntegrityError(first.object, first.message)
    if problems is not None:
        problems.extend(log.problems)
    return log.events


def check_events(store: Store) -> tuple[int, list[Problem]]:
    """Authenticate every event object and the chain (verify): ``(events read, problems)``."""
    log = read_event_log(store)
    return len(log.events), log.problems


def forget_tail(vault_id: str) -> None:
    """Forget what this process knows of ``vault_id``'s log tail (tests: another process)."""
    with _TAIL_LOCK:
        _TAIL.pop(vault_id, None)
