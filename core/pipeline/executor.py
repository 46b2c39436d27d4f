"""Running jobs: :func:`execute_job` (one job through the ledger, its outcome recorded, a
transient failure retried with backoff under :class:`RetryPolicy`), the :class:`Executor`
protocol that any runner implements, and the default :class:`ThreadExecutor`."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.types import CaptureIssue

if TYPE_CHECKING:
    import pluggy

from regionvault.core.pipeline.acting import acting_for
from regionvault.core.pipeline.jobs import (
    LISTED_ISSUES,
    Incomplete,
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
)
from regionvault.core.pipeline.ledger import Ledger, LedgerLock, runner_name

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "Executor", "RetryPolicy", "ThreadExecutor", "execute_job"]

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


#: the most runs a :class:`RetryPolicy` may allow: retries are for failures that pass soon
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class RetryPolicy:
    """How :func:`execute_job` retries a job whose handler raised
    :class:`~regionvault.core.errors.TransientError`: at most ``attempts`` runs in all.

    Before run ``n + 1`` it waits a delay that starts at ``first_delay`` seconds and grows by
    ``multiplier`` each time, never past ``max_delay``; the wait is drawn uniformly between
    half that delay and all of it, so runners throttled together do not all come back at the
    same moment. A service that said how long to wait (``retry_after``) is waited for at
    least that long, still at most ``max_delay``. Any other error is never retried here.
    ``sleep`` and ``jitter`` (a number in [0, 1)) are injectable, so tests need not wait;
    a ``stop`` event cuts a wait short only with the default ``sleep`` (an injected one runs
    whole, then the event is looked at).
    """

    attempts: int = 5
    first_delay: float = 2.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    jitter: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.attempts <= MAX_ATTEMPTS:
            raise RegionVaultError(
                f"retry attempts must be 1 to {MAX_ATTEMPTS}, got {self.attempts}"
            )
        if not 0 <= self.first_delay <= self.max_delay:
            raise RegionVaultError(
                f"retry delays must be 0 <= first_delay <= max_delay, got {self.first_delay} "
                f"and {self.max_delay}"
            )
        if self.multiplier < 1:
            raise RegionVaultError(f"retry multiplier must be at least 1, got {self.multiplier}")

    def wait(self, retry: int, error: TransientError) -> float:
        """Seconds to wait before retry number ``retry`` (1 before the second run)."""
        delay = self.first_delay
        for _ in range(min(retry, MAX_ATTEMPTS) - 1):
            delay = min(self.max_delay, delay * self.multiplier)
        wait = delay / 2 + self.jitter() * delay / 2
        if error.retry_after is not None and error.retry_after > 0:
            wait = max(wait, min(error.retry_after, self.max_delay))
        return wait


#: what executors use unless told otherwise: 5 runs, waits of about 2, 4, 8 and 16 seconds
DEFAULT_RETRY = RetryPolicy()
#: one run, no retry
NO_RETRY = RetryPolicy(attempts=1)


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
    retry: RetryPolicy = DEFAULT_RETRY,
    stop: threading.Event | None = None,
) -> JobOutcome:
    """Run ``job`` once, whatever else runs: the core of every executor.

    A key already done returns its recorded result (``REPLAYED``); a key another runner holds
    returns ``BUSY``; otherwise the handler runs under the key's lock and its result is
    recorded before the lock is released. A :class:`TransientError` runs the handler again,
    still under the lock, as ``retry`` says; the outcome's ``attempts`` counts the runs. Any
    other exception, or a transient one on the last attempt, becomes a ``FAILED`` outcome
    (and a call of the ``regionvault_on_job_failure`` hook); it is not recorded as done, so
    the next run retries it. Never raises for a failing job.

    ``stop`` ends a wait before a retry at once: the outcome is ``STOPPED`` (its error says
    ``stopped while waiting to retry``), with neither a failure record nor the hook (the
    runner stopped; the job did not fail), and not done, so a later run retries the key. It
    interrupts the wait itself only with ``retry.sleep`` left as :func:`time.sleep`: an
    injected sleep runs whole, and ``stop`` is looked at when it returns. A lock lost during
    a wait gives ``BUSY`` (docs/jobs.md, Retries).
    """
    recorded = ledger.record(job.key)
    if recorded is not None:
        return _replayed(recorded)
    lock = ledger.acquire(job.key)
    if lock is None:
        return _busy(job, ledger, attempts=0)
    try:
        # It may have finished between the first look and taking the lock.
        recorded = ledger.record(job.key)
        if recorded is not None:
            return _replayed(recorded)
        started = _now()
        ran = _run_with_retries(job, handlers, lock, retry, stop)
        attempts, result, error = ran.attempts, ran.result, ran.error
        if ran.lost:
            return _busy(job, ledger, attempts=attempts)
        if ran.stopped:
            return _stopped(job, started, attempts, error)
        if error is not None:
            return _failed(job, error, started, ledger, plugin_manager, attempts)
        issues: tuple[CaptureIssue, ...] = ()
        issues_total = 0
        if isinstance(result, Incomplete):
            issues, issues_total = result.issues[:LISTED_ISSUES], max(0, result.total)
            result = result.result
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            error = RegionVaultError(f"job {job.key}: result is not plain JSON data: {exc}")
            return _failed(job, error, started, ledger, plugin_manager, attempts)
        outcome = JobOutcome(
            job.key,
            job.kind,
            job.region,
            JobStatus.DONE,
            result=result,
            started_at=started,
            finished_at=_now(),
            runner=runner_name(),
            issues=issues,
            issues_total=issues_total,
            attempts=attempts,
        )
        if _held(job, lock) is False:
            # the fence: a runner that stopped renewing past lock_ttl (paused, cut off from
            # the ledger) lost the key, and another runner may own it now: its outcome is
            # not ours to record (a scheduled backup's point is fenced by its id instead)
            log.warning(
                "job %s: lost its lock while running; another runner owns the key, nothing "
                "recorded here",
                job.key,
            )
            return _busy(job, ledger, attempts=attempts, lost=True)
        try:
            ledger.mark_done(outcome, **_expiry(ledger, job))
        except (OSError, RegionVaultError) as exc:
            # The work is done but unrecorded: a later run repeats it (jobs are idempotent).
            # a Redis ledger failing for a moment stays transient (the next run may record it)
            wrap = TransientError if isinstance(exc, TransientError) else RegionVaultError
            error = wrap(f"job {job.key}: recording its result failed: {exc}")
            return _failed(job, error, started, ledger, plugin_manager, attempts)
        return outcome
    finally:
        lock.release()


def _busy(job: Job, ledger: Ledger, *, attempts: int, lost: bool = False) -> JobOutcome:
    holder = ledger.holder(job.key) or {}
    return JobOutcome(
        job.key,
        job.kind,
        job.region,
        JobStatus.BUSY,
        error="lost its lock while running; another runner owns the key" if lost else None,
        runner=f"{holder.get('host', '?')}:{holder.get('pid', '?')}",
        attempts=attempts,
    )


#: how long the record of a plan job (``plan-*``: a distributed tick's planning, keyed by the
#: tick's time, never made again) is kept
PLAN_RECORD_TTL = timedelta(days=1)

#: ledger types whose ``mark_done`` takes ``expires`` (looked up once per type)
_TAKES_EXPIRES: dict[type, bool] = {}


def _takes_expires(ledger: Ledger) -> bool:
    kind = type(ledger)
    known = _TAKES_EXPIRES.get(kind)
    if known is None:
        try:
            params = inspect.signature(ledger.mark_done).parameters
        except (TypeError, ValueError):
            known = False
        else:
            known = "expires" in params or any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
            )
        _TAKES_EXPIRES[kind] = known
    return known


def _expiry(ledger: Ledger, job: Job) -> dict[str, timedelta]:
    """``mark_done``'s keywords for ``job``: a plan job's record expires (a ledger written
    before ``expires``, an older custom one, is called without it and keeps it)."""
    if job.kind.startswith("plan-") and _takes_expires(ledger):
        return {"expires": PLAN_RECORD_TTL}
    return {}


@dataclass(frozen=True)
class _Ran:
    attempts: int
    result: object = None
    #: the error that ends the job (None: it succeeded)
    error: Exception | None = None
    #: the lock was lost while waiting to retry: another runner may hold the key now
    lost: bool = False
    #: ``stop`` was set while waiting to retry
    stopped: bool = False


def _held(job: Job, lock: LedgerLock) -> bool | None:
    """Whether ``lock`` is still held, renewing it; None when renewing it failed (whether it
    is held cannot be told). A lock without ``renew`` (a ledger written against the protocol
    of earlier versions, release only) counts as held, as it did then."""
    renew = getattr(lock, "renew", None)
    if renew is None:
        return True
    try:
        return bool(renew())
    except Exception:
        log.exception("job %s: renewing its lock failed", job.key)
        return None


def _wait(retry: RetryPolicy, stop: threading.Event | None, seconds: float) -> bool:
    """Wait before a retry; True when ``stop`` was set (before or during the wait)."""
    if stop is None:
        retry.sleep(seconds)
        return False
    if retry.sleep is time.sleep:
        return stop.wait(seconds)
    retry.sleep(seconds)  # an injected sleep (tests): asked, then the event looked at
    return stop.is_set()


def _run_with_retries(
    job: Job,
    handlers: JobHandlers,
    lock: LedgerLock,
    retry: RetryPolicy,
    stop: threading.Event | None,
) -> _Ran:
    """Runs the handler while ``lock`` is held: the lock's renewer keeps it through the
    waits, and a lock lost meanwhile (it expired and another runner broke it) ends the
    retries, so two runners never start the key at once."""
    attempt = 1
    while True:
        try:
            with acting_for(job.key):  # the events the handler records name its job
                return _Ran(attempt, handlers.get(job.kind)(job))
        except TransientError as exc:
            if attempt >= retry.attempts:
                return _Ran(attempt, error=exc)
            wait = retry.wait(attempt, exc)
            log.warning(
                "job %s: transient failure on attempt %d of %d, retrying in %.1fs: %s",
                job.key,
                attempt,
                retry.attempts,
                wait,
                exc,
            )
            if _wait(retry, stop, wait):
                return _Ran(attempt, error=exc, stopped=True)
            held = _held(job, lock)
            if held is False:
                log.warning(
                    "job %s: lost its lock while waiting to retry; not run again here "
                    "(another runner may hold the key)",
                    job.key,
                )
                return _Ran(attempt, error=exc, lost=True)
            if held is None:
                error = RegionVaultError(
                    f"job {job.key}: could not renew its lock to retry after {exc}"
                )
                return _Ran(attempt, error=error)
            attempt += 1
        except Exception as exc:
            return _Ran(attempt, error=exc)


def _stopped(job: Job, started: datetime, attempts: int, error: Exception | None) -> JobOutcome:
    last = "" if error is None else f" (last: {type(error).__name__}: {error})"
    outcome = JobOutcome(
        job.key,
        job.kind,
        job.region,
        JobStatus.STOPPED,
        error=f"stopped while waiting to retry{last}",
        started_at=started,
        finished_at=_now(),
        runner=runner_name(),
        attempts=attempts,
    )
    log.warning("job %s: %s", job.key, outcome.error)
    return outcome


def _failed(
    job: Job,
    error: Exception,
    started: datetime,
    ledger: Ledger,
    plugin_manager: pluggy.PluginManager | None,
    attempts: int,
) -> JobOutcome:
    outcome = JobOutcome(
        job.key,
        job.kind,
        job.region,
        JobStatus.FAILED,
        error=f"{type(error).__name__}: {error}",
        started_at=started,
        finished_at=_now(),
        runner=runner_name(),
        attempts=attempts,
    )
    log.error("job %s failed after %d attempt(s): %s", job.key, attempts, outcome.error)
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
        attempts=recorded.attempts,
    )


@runtime_checkable
class Executor(Protocol):
    """Runs jobs. Whatever the executor, a key runs at most once at a time and, once done,
    never again (the ledger sees to it).

    An executor that runs each job in the region
    :func:`~regionvault.core.pipeline.jobs.runs_in` names, on workers holding that region's
    credentials alone, says so with a ``distributed`` attribute that is True (not part of the
    protocol: an executor without it is not distributed); the service then plans its ticks
    as jobs too (docs/jobs.md, "A distributed tick")."""

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
    that to other processes and machines sharing ``state_dir``. A job that fails transiently
    is retried as ``retry`` says, on its thread, which it keeps while it waits; setting
    ``stop`` ends such waits at once (:func:`execute_job`).
    """

    def __init__(
        self,
        handlers: JobHandlers,
        ledger: Ledger,
        *,
        max_workers: int = 4,
        plugin_manager: pluggy.PluginManager | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        stop: threading.Event | None = None,
    ) -> None:
        if max_workers < 1:
            raise RegionVaultError(f"max_workers must be at least 1, got {max_workers}")
        self.handlers = handlers
        self.ledger = ledger
        self.plugin_manager = plugin_manager
        self.retry = retry
        self.stop = stop
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="regionvault")
        self._inflight: dict[str, Future[JobOutcome]] = {}
        self._lock = threading.RLock()

    def submit(self, job: Job) -> Future[JobOutcome]:
        with self._lock:
            running = self._inflight.get(job.key)
            if running is not None:
                return running
            future = self._pool.submit(
                execute_job,
                job,
                self.handlers,
                self.ledger,
                plugin_manager=self.plugin_manager,
                retry=self.retry,
                stop=self.stop,
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
