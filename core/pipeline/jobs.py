"""Jobs: every pipeline step as plain data with a stable key, run by an executor.

A :class:`Job` is a key, a kind, a region and a JSON payload, nothing else: it can be written
to a file, put on a message queue or sent to another machine. The code that runs a job is
looked up by its kind in :class:`JobHandlers`, so any runner that has the handlers (threads
here, Celery workers with one queue per region later; see docs/jobs.md) runs the same jobs.

Keys name the work, not the attempt: ``backup/local:east/i-abc/2026-11-25T00:00Z`` is "back up
i-abc in local:east for the slot starting 2026-11-25 00:00 UTC", whoever runs it and however
often. The :class:`JobLedger` records finished keys in the site's ``state_dir``, so running a
finished key again returns the recorded result without running anything; and an exclusive
lock file per key makes sure that two runners at once (threads or processes, on one machine
or sharing the directory) never both run it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote

from regionvault.core.errors import RegionVaultError
from regionvault.core.fsutil import write_atomic
from regionvault.core.types import CaptureIssue, IssueKind

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "BACKUP",
    "COPY",
    "COPY_COMMIT",
    "COPY_OFFER",
    "COPY_PHASES",
    "COPY_RECEIPT",
    "COPY_REQUEST",
    "COPY_SEND",
    "LISTED_ISSUES",
    "RETENTION",
    "TAG",
    "Executor",
    "Handler",
    "Incomplete",
    "Job",
    "JobHandlers",
    "JobLedger",
    "JobLock",
    "JobOutcome",
    "JobStatus",
    "Ledger",
    "LedgerLock",
    "ThreadExecutor",
    "backup_job",
    "copy_job",
    "copy_jobs_for",
    "copy_phase_job",
    "copy_receipt_job",
    "execute_job",
    "format_slot",
    "job_key",
    "parse_slot",
    "retention_job",
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
        """``ok``, ``incomplete``, ``failed``, or ``busy`` (another runner has it)."""
        if self.status is JobStatus.FAILED:
            return "failed"
        if self.status is JobStatus.BUSY:
            return "busy"
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


# --------------------------------------------------------------------------- ledger


class LedgerLock(Protocol):
    """A held lock on one key."""

    def release(self) -> None: ...


class Ledger(Protocol):
    """What :func:`execute_job` needs from a ledger: finished keys and one lock per key.

    :class:`JobLedger` keeps both in files; a distributed runner may keep them elsewhere (see
    docs/jobs.md), as long as ``acquire`` is exclusive across all runners of a key.
    """

    def record(self, key: str) -> JobOutcome | None:
        """The recorded outcome of a finished key, None if it has not finished."""
        ...

    def acquire(self, key: str) -> LedgerLock | None:
        """Take the key's lock; None while another live runner holds it."""
        ...

    def holder(self, key: str) -> Mapping[str, Any] | None:
        """Who holds the key's lock (``host``, ``pid``, ...), None if nobody."""
        ...

    def mark_done(self, outcome: JobOutcome) -> None: ...

    def mark_failed(self, outcome: JobOutcome) -> None: ...


_HOST = socket.gethostname()


def _runner() -> str:
    return f"{_HOST}:{os.getpid()}"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22; the command name (field 2) may contain spaces, so count from its ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobLock:
    """A held lock on one job key (see :meth:`JobLedger.acquire`). While held, a background
    thread renews its expiry every third of the ledger's ``lock_ttl``."""

    def __init__(self, ledger: JobLedger, key: str, path: Path, token: str) -> None:
        self.ledger = ledger
        self.key = key
        self.path = path
        self.token = token
        self._released = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"regionvault-lock-{key[:40]}", daemon=True
        )
        self._renewer.start()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def _renew_loop(self) -> None:
        interval = self.ledger.lock_ttl.total_seconds() / 3
        while not self._released.wait(interval):
            try:
                if not self.renew():
                    if not self.released:
                        log.error("lost the lock of job %s (it expired and was broken)", self.key)
                    return
            except OSError as exc:
                log.warning("renewing the lock of job %s failed: %s", self.key, exc)

    def renew(self) -> bool:
        """Push the expiry forward; False if the lock is no longer ours."""
        return self.ledger._renew(self)

    def release(self) -> None:
        if self._released.is_set():
            return
        self._released.set()
        if self._renewer is not threading.current_thread():
            self._renewer.join()
        self.ledger._release(self)

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class JobLedger:
    """Finished jobs and job locks, as small files under ``state_dir/jobs``.

    - ``done/<h>.json``: a finished key's outcome, written atomically (temporary file, fsync,
      rename), so it is either absent or complete;
    - ``failed/<h>.json``: the last failure of a key not yet done (for status reports);
    - ``locks/<h>.lock``: created with ``O_CREAT|O_EXCL`` by the runner of the key, holding its
      host, pid, process start time and expiry. It is stale, and broken, when its expiry has
      passed (a runner renews it while the job runs) or when its holder on this host is dead.

    ``<h>`` is a hash of the key (keys hold ``/`` and ``:``); each file holds the key itself.
    Breaking a stale lock, renewing and releasing are serialised by an ``flock`` on
    ``locks/.breaker``, so a runner can never remove a lock that another runner has just
    taken; ``flock`` is released by the kernel if its holder dies. POSIX only.
    """

    def __init__(self, state_dir: Path | str, *, lock_ttl: timedelta = timedelta(minutes=5)):
        if lock_ttl <= timedelta(0):
            raise RegionVaultError(f"lock_ttl must be positive, got {lock_ttl}")
        self.root = Path(state_dir) / "jobs"
        self.lock_ttl = lock_ttl
        for sub in ("done", "failed", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- records

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:40]

    def _path(self, sub: str, key: str, suffix: str = ".json") -> Path:
        return self.root / sub / (self._name(key) + suffix)

    def _read(self, path: Path, key: str) -> JobOutcome | None:
        try:
            data = json.loads(path.read_bytes())
            outcome = JobOutcome.from_dict(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this is outside damage; running the job again is safe.
            log.warning("ignoring unreadable job record %s: %s", path, exc)
            return None
        return outcome if outcome.key == key else None

    def record(self, key: str) -> JobOutcome | None:
        """The recorded outcome of a finished key, None if it has not finished."""
        return self._read(self._path("done", key), key)

    def last_failure(self, key: str) -> JobOutcome | None:
        return self._read(self._path("failed", key), key)

    def mark_done(self, outcome: JobOutcome) -> None:
        data = json.dumps(outcome.to_dict(), sort_keys=True, allow_nan=False).encode()
        write_atomic(self._path("done", outcome.key), data)
        self._path("failed", outcome.key).unlink(missing_ok=True)

    def mark_failed(self, outcome: JobOutcome) -> None:
        data = json.dumps(outcome.to_dict(), sort_keys=True, default=str).encode()
        write_atomic(self._path("failed", outcome.key), data)

    def forget(self, key: str) -> None:
        """Drop a key's records, so that it runs again."""
        self._path("done", key).unlink(missing_ok=True)
        self._path("failed", key).unlink(missing_ok=True)

    def prune(self, older_than: datetime) -> int:
        """Drop records of jobs finished before ``older_than`` (their slots are long past, so
        the scheduler will not make those keys again); returns how many."""
        cutoff = _utc(older_than, "older_than")
        removed = 0
        for sub in ("done", "failed"):
            for path in (self.root / sub).glob("*.json"):
                outcome = self._read(path, _peek_key(path))
                if outcome and outcome.finished_at and outcome.finished_at < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    # ---- locks

    @contextlib.contextmanager
    def _breaker(self) -> Iterator[None]:
        fd = os.open(self.root / "locks" / ".breaker", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _lock_body(self, key: str, token: str) -> bytes:
        pid = os.getpid()
        return json.dumps(
            {
                "key": key,
                "token": token,
                "host": _HOST,
                "pid": pid,
                "process_start": _process_start(pid),
                "expires_at": time.time() + self.lock_ttl.total_seconds(),
            },
            sort_keys=True,
        ).encode()

    def _is_stale(self, path: Path, body: bytes) -> bool:
        try:
            holder = json.loads(body)
            expires = float(holder["expires_at"])
            host, pid = str(holder["host"]), int(holder["pid"])
            start = holder.get("process_start")
        except (ValueError, KeyError, TypeError):
            # Empty or partial: its creator is between O_EXCL and write, or died there.
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age > self.lock_ttl.total_seconds()
        if expires < time.time():
            return True
        if host != _HOST:
            return False
        if not _pid_alive(pid):
            return True
        return start is not None and _process_start(pid) not in (None, start)

    def holder(self, key: str) -> dict[str, Any] | None:
        """Who holds ``key``'s lock (host, pid, expiry), None if nobody."""
        try:
            data: dict[str, Any] = json.loads(self._path("locks", key, ".lock").read_bytes())
        except (OSError, ValueError):
            return None
        return data

    def acquire(self, key: str) -> JobLock | None:
        """Take the exclusive lock on ``key``; None while a live runner holds it."""
        path = self._path("locks", key, ".lock")
        for _ in range(3):
            token = secrets.token_hex(16)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                try:
                    seen = path.read_bytes()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if not self._is_stale(path, seen):
                    return None
                with self._breaker():
                    try:
                        now = path.read_bytes()
                    except FileNotFoundError:
                        continue
                    # Only the very lock judged stale is removed, never a fresh one.
                    if now == seen and self._is_stale(path, now):
                        log.warning("breaking stale lock of job %s: %s", key, seen[:200])
                        path.unlink()
                continue
            try:
                os.write(fd, self._lock_body(key, token))
                os.fsync(fd)
            except OSError as exc:
                path.unlink(missing_ok=True)  # a lock its taker could not write is nobody's
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            finally:
                os.close(fd)
            return JobLock(self, key, path, token)
        return None

    def _owns(self, lock: JobLock) -> bool:
        try:
            return bool(json.loads(lock.path.read_bytes()).get("token") == lock.token)
        except (OSError, ValueError, AttributeError):
            return False

    def _renew(self, lock: JobLock) -> bool:
        with self._breaker():
            if not self._owns(lock):
                return False
            write_atomic(lock.path, self._lock_body(lock.key, lock.token))
            return True

    def _release(self, lock: JobLock) -> None:
        with self._breaker():
            if self._owns(lock):
                lock.path.unlink(missing_ok=True)


def _peek_key(path: Path) -> str:
    try:
        return str(json.loads(path.read_bytes()).get("key", ""))
    except (OSError, ValueError, AttributeError):
        return ""


# --------------------------------------------------------------------------- running


def _now() -> datetime:
    return datetime.now(UTC)


def _report_failure(
    plugin_manager: pluggy.PluginManager | None, job: Job, error: BaseException
) -> None:
    if plugin_manager is None:
        return
    try:
        plugin_manager.hook.regionvault_on_job_failure(job=job.key, region=job.region, error=error)
    except Exception:
        # A broken notifier must not turn one failure into two, or hide the first.
        log.exception("regionvault_on_job_failure hook failed for job %s", job.key)


def execute_job(
    job: Job,
    handlers: JobHandlers,
    ledger: Ledger,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
) -> JobOutcome:
    """Run ``job`` once, whatever else runs: the core of every executor.

    A key already done returns its recorded result (``REPLAYED``); a key another runner holds
    returns ``BUSY``; otherwise the handler runs under the key's lock and its result is
    recorded before the lock is released. A handler's exception becomes a ``FAILED`` outcome
    (and a call of the ``regionvault_on_job_failure`` hook); it is not recorded as done, so
    the next run retries. Never raises for a failing job.
    """
    recorded = ledger.record(job.key)
    if recorded is not None:
        return _replayed(recorded)
    lock = ledger.acquire(job.key)
    if lock is None:
        holder = ledger.holder(job.key) or {}
        return JobOutcome(
            job.key,
            job.kind,
            job.region,
            JobStatus.BUSY,
            runner=f"{holder.get('host', '?')}:{holder.get('pid', '?')}",
        )
    try:
        # It may have finished between the first look and taking the lock.
        recorded = ledger.record(job.key)
        if recorded is not None:
            return _replayed(recorded)
        started = _now()
        try:
            result = handlers.get(job.kind)(job)
        except Exception as exc:
            return _failed(job, exc, started, ledger, plugin_manager)
        issues: tuple[CaptureIssue, ...] = ()
        issues_total = 0
        if isinstance(result, Incomplete):
            issues, issues_total = result.issues[:LISTED_ISSUES], max(0, result.total)
            result = result.result
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = RegionVaultError(f"job {job.key}: result is not plain JSON data: {exc}")
            return _failed(job, error, started, ledger, plugin_manager)
        outcome = JobOutcome(
            job.key,
            job.kind,
            job.region,
            JobStatus.DONE,
            result=result,
            started_at=started,
            finished_at=_now(),
            runner=_runner(),
            issues=issues,
            issues_total=issues_total,
        )
        try:
            ledger.mark_done(outcome)
        except (OSError, RegionVaultError) as exc:
            # The work is done but unrecorded: a later run repeats it (jobs are idempotent).
            error = RegionVaultError(f"job {job.key}: recording its result failed: {exc}")
            return _failed(job, error, started, ledger, plugin_manager)
        return outcome
    finally:
        lock.release()


def _failed(
    job: Job,
    error: Exception,
    started: datetime,
    ledger: Ledger,
    plugin_manager: pluggy.PluginManager | None,
) -> JobOutcome:
    outcome = JobOutcome(
        job.key,
        job.kind,
        job.region,
        JobStatus.FAILED,
        error=f"{type(error).__name__}: {error}",
        started_at=started,
        finished_at=_now(),
        runner=_runner(),
    )
    log.error("job %s failed: %s", job.key, outcome.error)
    with contextlib.suppress(OSError, RegionVaultError):
        ledger.mark_failed(outcome)
    _report_failure(plugin_manager, job, error)
    return outcome


def _replayed(recorded: JobOutcome) -> JobOutcome:
    return JobOutcome(
        recorded.key,
        recorded.kind,
        recorded.region,
        JobStatus.REPLAYED,
        result=recorded.result,
        started_at=recorded.started_at,
        finished_at=recorded.finished_at,
        runner=recorded.runner,
        issues=recorded.issues,
        issues_total=recorded.issues_total,
    )


@runtime_checkable
class Executor(Protocol):
    """Runs jobs. Whatever the executor, a key runs at most once at a time and, once done,
    never again (the ledger sees to it)."""

    def submit(self, job: Job) -> Future[JobOutcome]:
        """Start ``job``; the future's result is its outcome (it never raises for a failing
        job)."""
        ...

    def run(self, jobs: Iterable[Job]) -> list[JobOutcome]:
        """Run ``jobs`` and wait for all of them; outcomes in the order given."""
        ...

    def close(self) -> None: ...


class ThreadExecutor:
    """The default executor: jobs run in this process on a bounded pool of threads.

    A key submitted while it is already in flight here shares the first submission's future,
    so at most one job per key runs at a time in this process; the ledger's lock extends
    that to other processes and machines sharing ``state_dir``.
    """

    def __init__(
        self,
        handlers: JobHandlers,
        ledger: Ledger,
        *,
        max_workers: int = 4,
        plugin_manager: pluggy.PluginManager | None = None,
    ) -> None:
        if max_workers < 1:
            raise RegionVaultError(f"max_workers must be at least 1, got {max_workers}")
        self.handlers = handlers
        self.ledger = ledger
        self.plugin_manager = plugin_manager
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="regionvault")
        self._inflight: dict[str, Future[JobOutcome]] = {}
        self._lock = threading.RLock()

    def submit(self, job: Job) -> Future[JobOutcome]:
        with self._lock:
            running = self._inflight.get(job.key)
            if running is not None:
                return running
            future = self._pool.submit(
                execute_job, job, self.handlers, self.ledger, plugin_manager=self.plugin_manager
            )
            self._inflight[job.key] = future

        def done(_: Future[JobOutcome], key: str = job.key) -> None:
            with self._lock:
                if self._inflight.get(key) is future:
                    del self._inflight[key]

        future.add_done_callback(done)
        return future

    def run(self, jobs: Iterable[Job]) -> list[JobOutcome]:
        futures = [self.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
