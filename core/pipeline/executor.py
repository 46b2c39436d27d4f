"""Running jobs: :func:`execute_job` (one job through the ledger, its outcome recorded), the
:class:`Executor` protocol that any runner implements, and the default :class:`ThreadExecutor`."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from regionvault.core.errors import RegionVaultError
from regionvault.core.types import CaptureIssue

if TYPE_CHECKING:
    import pluggy

from regionvault.core.pipeline.jobs import (
    LISTED_ISSUES,
    Incomplete,
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
)
from regionvault.core.pipeline.ledger import Ledger, runner_name

__all__ = ["Executor", "ThreadExecutor", "execute_job"]

log = logging.getLogger(__name__)


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
            runner=runner_name(),
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
        runner=runner_name(),
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
