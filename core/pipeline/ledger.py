"""The job ledger: finished keys recorded as files in the site's ``state_dir``, and an
exclusive lock file per key, so that a finished key is never run again and two runners never
run one key at once (docs/jobs.md)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from regionvault.core.errors import RegionVaultError
from regionvault.core.fsutil import write_atomic
from regionvault.core.pipeline.jobs import JobOutcome, _utc
from regionvault.core.procs import ProcessIdentity

__all__ = ["JobLedger", "JobLock", "Ledger", "LedgerLock", "RenewingLock", "runner_name"]

log = logging.getLogger(__name__)


class LedgerLock(Protocol):
    """A held lock on one key."""

    def release(self) -> None: ...

    def renew(self) -> bool:
        """Push the lock's expiry forward; False if it is no longer held (it expired and
        another runner broke it). The executor asks before each retry of a job."""
        ...


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

    def mark_done(self, outcome: JobOutcome, *, expires: timedelta | None = None) -> None:
        """Record ``outcome`` of a finished key. With ``expires``, the record vanishes that
        long after (the executor gives it to plan jobs, whose keys are never made again); a
        ledger written before ``expires`` existed is called without it (docs/jobs.md)."""
        ...

    def mark_failed(self, outcome: JobOutcome) -> None: ...


_HOST = socket.gethostname()


def runner_name() -> str:
    return f"{_HOST}:{os.getpid()}"


def _ticks(value: Any) -> int | None:
    # written as a string of digits (what every version compares), read either way
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class RenewingLock:
    """A held lock on one job key that a background thread renews every third of
    ``lock_ttl`` until it is released. A ledger's lock says how one renewal and the release
    are done (:meth:`_renew_once`, :meth:`_release_once`); :attr:`lost` is set once a
    renewal finds the lock no longer ours (expired and taken by another runner, or gone)."""

    #: what a failed renewal may raise that a later one may get past (logged, not raised)
    transient: tuple[type[Exception], ...] = (OSError,)

    def __init__(self, key: str, token: str, lock_ttl: timedelta) -> None:
        self.key = key
        self.token = token
        self.lock_ttl = lock_ttl
        self._released = threading.Event()
        #: set once this holder finds its lock gone
        self.lost = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"regionvault-lock-{key[:40]}", daemon=True
        )
        self._renewer.start()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def _renew_loop(self) -> None:
        interval = self.lock_ttl.total_seconds() / 3
        while not self._released.wait(interval):
            try:
                if not self.renew():
                    if not self.released:
                        log.error("lost the lock of job %s (it expired and was taken)", self.key)
                    return
            except self.transient as exc:
                # the store unreachable for a moment: a later renewal may reach it; if none
                # does within lock_ttl, the lock expires and renew() then says it is lost
                log.warning("renewing the lock of job %s failed: %s", self.key, exc)

    def renew(self) -> bool:
        """Push the expiry forward by ``lock_ttl``; False if the lock is no longer ours (and
        :attr:`lost` is then set)."""
        if self.lost.is_set():
            return False
        if self._renew_once():
            return True
        self.lost.set()
        return False

    def release(self) -> None:
        """Give the lock up (once; the renewals stop first)."""
        if self._released.is_set():
            return
        self._released.set()
        if self._renewer is not threading.current_thread():
            self._renewer.join()
        self._release_once()

    def _renew_once(self) -> bool:
        raise NotImplementedError

    def _release_once(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> RenewingLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class JobLock(RenewingLock):
    """A held lock on one job key (see :meth:`JobLedger.acquire`): a lock file, renewed by a
    background thread every third of the ledger's ``lock_ttl``."""

    def __init__(self, ledger: JobLedger, key: str, path: Path, token: str) -> None:
        self.ledger = ledger
        self.path = path
        super().__init__(key, token, ledger.lock_ttl)

    def _renew_once(self) -> bool:
        return self.ledger._renew(self)

    def _release_once(self) -> None:
        self.ledger._release(self)


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
            if _expired(data):
                return None
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

    def mark_done(self, outcome: JobOutcome, *, expires: timedelta | None = None) -> None:
        """Record a finished key; with ``expires``, the record is gone that long after (read
        as absent, deleted by :meth:`prune`)."""
        doc = outcome.to_dict()
        if expires is not None:
            doc["expires_at"] = time.time() + expires.total_seconds()
        data = json.dumps(doc, sort_keys=True, allow_nan=False).encode()
        write_atomic(self._path("done", outcome.key), data)
        self._path("failed", outcome.key).unlink(missing_ok=True)

    def mark_failed(self, outcome: JobOutcome) -> None:
        data = json.dumps(outcome.to_dict(), sort_keys=True, default=str).encode()
        write_atomic(self._path("failed", outcome.key), data)

    def forget(self, key: str) -> None:
        """Drop a key's records, so that it runs again."""
        self._path("done", key).unlink(missing_ok=True)
        self._path("failed", key).unlink(missing_ok=True)

    def prune(self, older_than: datetime, *, limit: int | None = 10_000) -> int:
        """Drop records of jobs finished before ``older_than`` (their slots are long past, so
        the scheduler will not make those keys again), and records whose ``expires`` has
        passed; returns how many. ``limit`` bounds the records dropped in one call."""
        cutoff = _utc(older_than, "older_than")
        removed = 0
        for sub in ("done", "failed"):
            for path in (self.root / sub).glob("*.json"):
                if limit is not None and removed >= limit:
                    return removed
                try:
                    data = json.loads(path.read_bytes())
                except FileNotFoundError:
                    continue
                except ValueError:
                    data = None
                if isinstance(data, dict) and _expired(data):
                    path.unlink(missing_ok=True)
                    removed += 1
                    continue
                outcome = self._read(path, _peek_key(path))
                if outcome and outcome.finished_at and outcome.finished_at < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def finished(self, *, since: datetime | None = None, limit: int = 100) -> list[JobOutcome]:
        """The newest finished keys' records (at most ``limit``), newest first; only those
        finished at or after ``since`` when given (as ``RedisLedger.finished``)."""
        low = None if since is None else _utc(since, "since")
        found: list[JobOutcome] = []
        for path in (self.root / "done").glob("*.json"):
            outcome = self._read(path, _peek_key(path))
            if outcome is None:
                continue
            if low is not None and (outcome.finished_at is None or outcome.finished_at < low):
                continue
            found.append(outcome)
        oldest = datetime.min.replace(tzinfo=UTC)
        found.sort(key=lambda o: o.finished_at or oldest, reverse=True)
        return found[: max(0, limit)]

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
        """The lock file's content. Its form is read by every runner sharing ``state_dir``,
        older versions too (in a rolling upgrade both run at once), so it only grows: the
        fields of earlier versions keep their names and types (``process_start`` is a
        string: earlier versions compare it with one, and an int would make them judge
        every live lock stale), and a new field is one they ignore."""
        me = ProcessIdentity.current()
        return json.dumps(
            {
                "key": key,
                "token": token,
                "host": me.host,
                "pid": me.pid,
                "process_start": None if me.ticks is None else str(me.ticks),
                "boot_id": me.boot,
                "pid_ns": None if me.pid_ns is None else str(me.pid_ns),
                "machine": me.machine,
                "expires_at": time.time() + self.lock_ttl.total_seconds(),
            },
            sort_keys=True,
        ).encode()

    def _is_stale(self, path: Path, body: bytes) -> bool:
        try:
            holder = json.loads(body)
            expires = float(holder["expires_at"])
            host, pid = str(holder["host"]), int(holder["pid"])
            identity = ProcessIdentity(
                host,
                pid,
                _ticks(holder.get("process_start")),
                _text(holder.get("boot_id")),
                _ticks(holder.get("pid_ns")),
                _text(holder.get("machine")),
            )
        except (ValueError, KeyError, TypeError):
            # Empty or partial: its creator is between O_EXCL and write, or died there.
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age > self.lock_ttl.total_seconds()
        if expires < time.time():
            return True
        # a holder nobody here can judge (another host, another pid namespace) is judged by
        # its expiry alone (alive() is None); one of an earlier boot of this machine id is
        # dead: state_dir is this machine's (clones sharing one id: docs/jobs.md, Locks)
        return identity.alive() is False

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


def _expired(data: Any) -> bool:
    expires = data.get("expires_at") if isinstance(data, dict) else None
    return isinstance(expires, int | float) and expires <= time.time()


def _peek_key(path: Path) -> str:
    try:
        return str(json.loads(path.read_bytes()).get("key", ""))
    except (OSError, ValueError, AttributeError):
        return ""
