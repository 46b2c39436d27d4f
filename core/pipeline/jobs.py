"""Jobs: every pipeline step as plain data with a stable key, run by an executor.

A :class:`Job` is a key, a kind, a region and a JSON payload, nothing else: it can be written
to a file, put on a message queue or sent to another machine. The code that runs a job is
looked up by its kind in :class:`JobHandlers`, so any runner that has the handlers (threads
here, Celery workers with one queue per region later; see docs/jobs.md) runs the same jobs.

Keys name the work, not the attempt: ``backup/local:east/i-abc/2026-11-25T00:00Z`` is "back up
i-abc in local:east for the slot starting 2026-11-25 00:00 UTC", whoever runs it and however
often. The ledger (:mod:`regionvault.core.pipeline.ledger`) records finished keys in the site's
``state_dir``, so running a finished key again returns the recorded result without running
anything; and an exclusive lock file per key makes sure that two runners at once (threads or
processes, on one machine or sharing the directory) never both run it.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from regionvault.core.errors import RegionVaultError
from regionvault.core.types import CaptureIssue, IssueKind

if TYPE_CHECKING:
    pass

__all__ = [
    "BACKUP",
    "COPY",
    "COPY_COMMIT",
    "COPY_OFFER",
    "COPY_PHASES",
    "COPY_RECEIPT",
    "COPY_REQUEST",
    "COPY_SEND",
    "DRILL",
    "LISTED_ISSUES",
    "PLAN_BACKUPS",
    "PLAN_DRILLS",
    "PLAN_INBOX",
    "PLAN_KINDS",
    "PLAN_OFFERS",
    "RETENTION",
    "RUN_TAG",
    "SLOT_TAG",
    "TAG",
    "Handler",
    "Incomplete",
    "Job",
    "JobHandlers",
    "JobOutcome",
    "JobStatus",
    "backup_job",
    "copy_job",
    "copy_jobs_for",
    "copy_phase_job",
    "copy_receipt_job",
    "drill_job",
    "format_slot",
    "job_key",
    "parse_slot",
    "plan_job",
    "retention_job",
    "runs_in",
    "slot_of",
    "split_key",
    "tag_job",
]

log = logging.getLogger(__name__)

#: the kinds of job the pipeline makes (handlers for other kinds may be registered too)
TAG = "tag"
BACKUP = "backup"
COPY = "copy"
RETENTION = "retention"
#: a scheduled drill: restore an instance's newest copy in a region, launch, health-check,
#: terminate (core/pipeline/drills.py)
#: recorded in a recovery point's tags: the schedule slot it was made for
SLOT_TAG = "regionvault:slot"
#: the tag of a scheduled block backup that keeps its capture: which run made the point (its
#: id is the same for every run of the slot, so the kept-capture records tell them apart)
RUN_TAG = "regionvault:run"

DRILL = "drill"
#: a copy in four phases, each run in one region with that region's credentials alone
#: (docs/jobs.md): the source offers, the destination requests, the source sends, the
#: destination commits
COPY_OFFER = "copy-offer"
COPY_REQUEST = "copy-request"
COPY_SEND = "copy-send"
COPY_COMMIT = "copy-commit"
COPY_PHASES = (COPY_OFFER, COPY_REQUEST, COPY_SEND, COPY_COMMIT)
#: the source takes in the destination's receipt for a copy (a region's own tick: docs/jobs.md)
COPY_RECEIPT = "copy-receipt"
#: the phases that run in the source region (the others run in the destination)
_SOURCE_PHASES = frozenset({COPY_OFFER, COPY_SEND})
#: planning as jobs (a distributed tick, docs/jobs.md): each runs in one region and returns
#: the jobs of the tick's next round there: its due backups; its side of every copy its inbox
#: holds something of (two rounds); the copies it offers
PLAN_BACKUPS = "plan-backups"
PLAN_INBOX = "plan-inbox"
PLAN_OFFERS = "plan-offers"
#: ... and its drills due (core/pipeline/drills.py)
PLAN_DRILLS = "plan-drills"
PLAN_KINDS = (PLAN_BACKUPS, PLAN_INBOX, PLAN_OFFERS, PLAN_DRILLS)

_KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_KEY = re.compile(r"[\x21-\x7e]{1,512}")  # printable ASCII, no spaces
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- keys and slots


def _utc(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RegionVaultError(f"{what} {moment.isoformat()} has no time zone (use UTC)")
    return moment.astimezone(UTC)


def format_slot(slot: datetime) -> str:
    """A slot as it appears in a job key: UTC, to the minute when it falls on one
    (``2026-11-25T00:00Z``)."""
    slot = _utc(slot, "slot")
    if slot.second == 0 and slot.microsecond == 0:
        return slot.strftime("%Y-%m-%dT%H:%MZ")
    if slot.microsecond == 0:
        return slot.strftime("%Y-%m-%dT%H:%M:%SZ")
    return slot.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_slot(text: str) -> datetime:
    """The inverse of :func:`format_slot`."""
    for fmt in ("%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise RegionVaultError(f"{text!r} is not a slot like 2026-11-25T00:00Z")


def slot_of(moment: datetime, every: timedelta) -> datetime:
    """The start of the slot of length ``every`` that holds ``moment``: slots are counted from
    the Unix epoch, so every runner anywhere computes the same one (``floor(t / every)``)."""
    if every <= timedelta(0):
        raise RegionVaultError(f"a slot length must be positive, got {every}")
    since = _utc(moment, "time") - _EPOCH
    return _EPOCH + (since // every) * every


def _part(text: str) -> str:
    # '/' separates key parts; an id that contains one (an Azure resource id) is escaped
    return quote(str(text), safe=":@-._~+=,")


def job_key(kind: str, region: str | None, *parts: str) -> str:
    """``kind/region/part/...``, each part escaped so that ``/`` only separates parts."""
    return "/".join([kind, _part(region or "-"), *(_part(p) for p in parts)])


def split_key(key: str) -> list[str]:
    """The parts of a key made by :func:`job_key`, unescaped."""
    return [unquote(p) for p in key.split("/")]


# --------------------------------------------------------------------------- jobs


def _freeze_json(payload: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    try:
        text = json.dumps(dict(payload), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegionVaultError(f"job {key}: payload is not plain JSON data: {exc}") from None
    frozen: dict[str, Any] = json.loads(text)
    return MappingProxyType(frozen)


@dataclass(frozen=True)
class Job:
    """One step of the pipeline as plain data.

    ``key`` is stable (the same work always has the same key); ``kind`` selects the handler;
    ``region`` is where the job must run (the region whose credentials it needs; a
    distributed runner routes it to that region's queue); ``payload`` is JSON data only.
    """

    key: str
    kind: str
    region: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY.fullmatch(self.key):
            raise RegionVaultError(
                f"job key {self.key!r} must be 1-512 printable ASCII characters without spaces"
            )
        if not isinstance(self.kind, str) or not _KIND.fullmatch(self.kind):
            raise RegionVaultError(f"job {self.key}: kind {self.kind!r} must be like 'backup'")
        object.__setattr__(self, "payload", _freeze_json(self.payload, self.key))

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "region": self.region,
            "payload": dict(self.payload),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        try:
            return cls(
                key=data["key"],
                kind=data["kind"],
                region=data.get("region"),
                payload=data.get("payload") or {},
            )
        except KeyError as exc:
            raise RegionVaultError(f"job data lacks {exc.args[0]!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls.from_dict(json.loads(text))


def tag_job(region: str, slot: datetime) -> Job:
    """Tag the instances of ``region``, once per tagger slot."""
    return Job(job_key(TAG, region, format_slot(slot)), TAG, region, {"slot": format_slot(slot)})


def backup_job(
    region: str, instance_id: str, slot: datetime, payload: Mapping[str, Any] | None = None
) -> Job:
    """Back up ``instance_id`` in its home ``region`` for the schedule slot ``slot``."""
    data = {"instance_id": instance_id, "slot": format_slot(slot), **(payload or {})}
    return Job(job_key(BACKUP, region, instance_id, format_slot(slot)), BACKUP, region, data)


def copy_job(
    source_region: str,
    recovery_point: str,
    destination: str,
    payload: Mapping[str, Any] | None = None,
) -> Job:
    """Copy ``recovery_point`` from ``source_region`` to ``destination``. It runs in the
    source region, which reads its own recovery point and may only seal for the destination."""
    data = {"recovery_point": recovery_point, "destination": destination, **(payload or {})}
    return Job(job_key(COPY, source_region, recovery_point, destination), COPY, source_region, data)


def copy_phase_job(
    phase: str,
    region: str,
    recovery_point: str,
    peer: str,
    *,
    slot: datetime | None = None,
    payload: Mapping[str, Any] | None = None,
) -> Job:
    """One phase of copying ``recovery_point``, run in ``region``, with ``peer`` the other
    region: for ``copy-offer`` and ``copy-send`` ``region`` is the source and ``peer`` the
    destination, for ``copy-request`` and ``copy-commit`` the reverse. ``phase`` may be
    given with or without its ``copy-`` prefix. With ``slot``, the key names that schedule
    slot, so that a chain stuck in one slot starts afresh in the next.

    The key is ``copy-<phase>/<region>/<recovery point>/<peer>[/<slot>]``; the payload
    names ``recovery_point``, ``source`` and ``destination``.
    """
    kind = phase if phase.startswith("copy-") else f"copy-{phase}"
    if kind not in COPY_PHASES:
        known = ", ".join(p.removeprefix("copy-") for p in COPY_PHASES)
        raise RegionVaultError(f"{phase!r} is not a copy phase (known: {known})")
    if region == peer:
        raise RegionVaultError(f"cannot copy {recovery_point} from {region} to itself")
    source, destination = (region, peer) if kind in _SOURCE_PHASES else (peer, region)
    parts = [recovery_point, peer] + ([format_slot(slot)] if slot is not None else [])
    data = {
        "recovery_point": recovery_point,
        "source": source,
        "destination": destination,
        **({"slot": format_slot(slot)} if slot is not None else {}),
        **(payload or {}),
    }
    return Job(job_key(kind, region, *parts), kind, region, data)


def copy_jobs_for(
    source_region: str,
    recovery_point: str,
    destination: str,
    *,
    expires_at: datetime | None,
    slot: datetime | None = None,
) -> list[Job]:
    """The four jobs that copy ``recovery_point`` from ``source_region`` to ``destination``,
    in the order they must run, each only once the one before it has succeeded: offer
    (source), request (destination), send (source), commit (destination). ``expires_at``
    (None: kept until forgotten by hand) travels in the commit's payload."""
    expiry = None if expires_at is None else _utc(expires_at, "expires_at").isoformat()
    return [
        copy_phase_job(COPY_OFFER, source_region, recovery_point, destination, slot=slot),
        copy_phase_job(COPY_REQUEST, destination, recovery_point, source_region, slot=slot),
        copy_phase_job(COPY_SEND, source_region, recovery_point, destination, slot=slot),
        copy_phase_job(
            COPY_COMMIT,
            destination,
            recovery_point,
            source_region,
            slot=slot,
            payload={"expires_at": expiry},
        ),
    ]


def copy_receipt_job(
    source_region: str, recovery_point: str, destination: str, *, slot: datetime
) -> Job:
    """Take in ``destination``'s receipt for its copy of ``recovery_point`` from the source's
    inbox and record it in the source's vault; runs in ``source_region``, once per slot.

    The key is ``copy-receipt/<source>/<recovery point>/<destination>/<slot>``."""
    if source_region == destination:
        raise RegionVaultError(f"cannot copy {recovery_point} from {source_region} to itself")
    data = {
        "recovery_point": recovery_point,
        "source": source_region,
        "destination": destination,
        "slot": format_slot(slot),
    }
    key = job_key(COPY_RECEIPT, source_region, recovery_point, destination, format_slot(slot))
    return Job(key, COPY_RECEIPT, source_region, data)


def retention_job(region: str, slot: datetime) -> Job:
    """Apply retention to ``region``'s vault, once per slot."""
    return Job(
        job_key(RETENTION, region, format_slot(slot)),
        RETENTION,
        region,
        {"slot": format_slot(slot)},
    )


def drill_job(
    region: str, instance_id: str, slot: datetime, payload: Mapping[str, Any] | None = None
) -> Job:
    """Drill ``instance_id``'s newest copy in ``region`` (a destination), once per drill slot
    (``slot_of(now, drill interval)``): it runs in ``region``, with its credentials alone.

    The key is ``drill/<region>/<instance>/<slot>``."""
    data = {"instance_id": instance_id, "slot": format_slot(slot), **(payload or {})}
    return Job(job_key(DRILL, region, instance_id, format_slot(slot)), DRILL, region, data)


def plan_job(kind: str, region: str, at: datetime, *, step: int | None = None) -> Job:
    """Plan ``region``'s next round of the tick that started ``at`` (``kind`` one of
    :data:`PLAN_KINDS`); ``step`` numbers the passes of the inbox and offer rounds in one
    tick. The tick's time is in the key, so a plan delivered twice returns the first
    delivery's plan (the ledger's record), and every tick plans afresh.

    The key is ``plan-<what>/<region>/<tick time>[/<step>]``; the payload says ``at``."""
    if kind not in PLAN_KINDS:
        raise RegionVaultError(f"{kind!r} is not a plan job kind (known: {', '.join(PLAN_KINDS)})")
    at_text = format_slot(at)
    parts = [at_text] + ([str(step)] if step is not None else [])
    payload: dict[str, Any] = {"at": at_text}
    if step is not None:
        payload["step"] = step
    return Job(job_key(kind, region, *parts), kind, region, payload)


def _same_region(a: str, b: str) -> bool:
    # a region may be named in full (local:east) or by its short name (east)
    if a == b:
        return True
    return (":" not in a or ":" not in b) and a.rpartition(":")[2] == b.rpartition(":")[2]


def runs_in(job: Job) -> str | None:
    """The region whose credentials ``job`` needs, where an executor must run it (for a
    distributed one: the queue it goes to); None for a job of no region.

    A copy phase runs in its source (``copy-offer``, ``copy-send``, ``copy-receipt``) or its
    destination (``copy-request``, ``copy-commit``), as its payload names them; every other
    kind in ``job.region`` (``copy``, both halves in one call, needs the destination's
    Sealer too but its source's keys: it runs in the source). A job whose ``region`` is not
    the side its payload says it runs on is an error, so that no job is routed to the wrong
    region's workers."""
    if job.kind in COPY_PHASES or job.kind == COPY_RECEIPT:
        side = "source" if job.kind in _SOURCE_PHASES or job.kind == COPY_RECEIPT else "destination"
        named = job.payload.get(side)
        mismatch = named is not None and job.region is not None
        if mismatch and not _same_region(str(named), str(job.region)):
            raise RegionVaultError(
                f"job {job.key}: a {job.kind} job runs in its {side} {named}, "
                f"but names {job.region}"
            )
        return job.region if job.region is not None else None if named is None else str(named)
    return job.region


# --------------------------------------------------------------------------- outcomes

#: a job's outcome names at most this many of its issues (it counts them all)
LISTED_ISSUES = 20


class JobStatus(enum.StrEnum):
    #: the job ran now and succeeded (or did its work but not whole: see
    #: :attr:`JobOutcome.incomplete`)
    DONE = "done"
    #: the key had finished before: nothing ran, the recorded result is returned
    REPLAYED = "replayed"
    #: another runner holds the key right now: nothing ran here
    BUSY = "busy"
    #: the job ran and raised; it is not recorded as done, so a later run retries it
    FAILED = "failed"
    #: the runner was stopped (``stop`` set) while the job waited to retry: not done, so a
    #: later run retries it, and not a failure (no failure record, no failure hook)
    STOPPED = "stopped"


@dataclass(frozen=True)
class JobOutcome:
    key: str
    kind: str
    region: str | None
    status: JobStatus
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: ``host:pid`` of the runner that ran (or holds) the job
    runner: str | None = None
    #: what the job could not do whole (a backup's entries it did not take), the first
    #: :data:`LISTED_ISSUES` of :attr:`issues_total`
    issues: tuple[CaptureIssue, ...] = ()
    issues_total: int = 0
    #: how many times the handler ran for this outcome: more than 1 when transient failures
    #: were retried (docs/jobs.md, "Retries"); 0 when nothing ran here (``BUSY``), or the runs
    #: made here before the lock was lost while waiting to retry (``BUSY`` too)
    attempts: int = 1

    @property
    def ok(self) -> bool:
        """The job's work is done (it may be :attr:`incomplete`, and is done all the same:
        its key is not run again)."""
        return self.status in (JobStatus.DONE, JobStatus.REPLAYED)

    @property
    def incomplete(self) -> bool:
        """Done, but not whole: a backup whose recovery point names entries it could not
        take. The ledger records it as done (the point exists), with its issues."""
        return self.ok and self.issues_total > 0

    @property
    def outcome(self) -> str:
        """``ok``, ``incomplete``, ``failed``, ``busy`` (another runner has it), or
        ``stopped`` (the runner stopped while the job waited to retry)."""
        if self.status is JobStatus.FAILED:
            return "failed"
        if self.status is JobStatus.BUSY:
            return "busy"
        if self.status is JobStatus.STOPPED:
            return "stopped"
        return "incomplete" if self.incomplete else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "region": self.region,
            "status": str(self.status),
            "outcome": self.outcome,
            "result": self.result,
            "error": self.error,
            "issues": None
            if not self.issues_total
            else {
                "total": self.issues_total,
                "listed": [
                    {"path": i.path, "kind": i.kind.value, "message": i.message}
                    for i in self.issues
                ],
            },
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "runner": self.runner,
            "attempts": self.attempts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobOutcome:
        def when(value: Any) -> datetime | None:
            return datetime.fromisoformat(value) if isinstance(value, str) else None

        issues = data.get("issues") or {"total": 0, "listed": []}
        return cls(
            key=data["key"],
            kind=data["kind"],
            region=data.get("region"),
            status=JobStatus(data["status"]),
            result=data.get("result"),
            error=data.get("error"),
            started_at=when(data.get("started_at")),
            finished_at=when(data.get("finished_at")),
            runner=data.get("runner"),
            issues=tuple(
                CaptureIssue(str(i["path"]), IssueKind(i["kind"]), str(i["message"]))
                for i in issues["listed"]
            ),
            issues_total=int(issues["total"]),
            # records written before attempts were counted: one run
            attempts=int(data.get("attempts", 1)),
        )


# --------------------------------------------------------------------------- handlers

Handler = Callable[[Job], Any]


@dataclass(frozen=True)
class Incomplete:
    """What a handler returns for work it did, but not whole: a backup whose recovery point
    names entries the capture could not take. The job is done for its key (it is not run
    again: the point exists), and its outcome says what was not taken: ``result`` is the
    job's result as usual, ``issues`` the first few of ``total``."""

    result: Any
    issues: tuple[CaptureIssue, ...]
    total: int


class JobHandlers:
    """The function that runs each kind of job. A handler takes the :class:`Job` and returns
    plain JSON data (recorded as the job's result) or raises."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        for kind, handler in (handlers or {}).items():
            self.register(kind, handler)

    def register(self, kind: str, handler: Handler) -> None:
        if not _KIND.fullmatch(kind):
            raise RegionVaultError(f"job kind {kind!r} must be like 'backup'")
        if kind in self._handlers and self._handlers[kind] is not handler:
            raise RegionVaultError(f"a handler for job kind {kind!r} is already registered")
        self._handlers[kind] = handler

    def get(self, kind: str) -> Handler:
        try:
            return self._handlers[kind]
        except KeyError:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise RegionVaultError(f"no handler for job kind {kind!r} (known: {known})") from None

    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers
