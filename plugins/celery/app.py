"""The Celery app of a site's ``[executor]`` and its one task, ``regionvault.run_job``.

The coordinator (``regionvault tick`` / ``run``) sends each job, as ``job.to_dict()``, to the
queue of the region :func:`~regionvault.core.pipeline.jobs.runs_in` names
(``<namespace>.region.<region>``, :func:`~regionvault.plugins.celery.settings.queue_of`), with
the site's ``namespace`` and the time it was sent; a worker of that
region (``regionvault worker --region R``) runs it with :func:`execute_job` over its own site
and the site's shared :class:`~regionvault.plugins.celery.ledger.RedisLedger`, and returns
``{"outcome": outcome.to_dict(), "problems": [...], "worker": nodename}``.

Delivery (docs/distributed.md): acknowledged late (after the job), one job prefetched at a
time, a job whose pool process died is rejected and so delivered again
(``task_reject_on_worker_lost``), a job whose worker died with it comes back after the
broker's ``visibility_timeout``. Each delivery goes through the ledger, so a key delivered
twice does its work once: a second delivery that finds the key held waits until the
holder's lock expires or it finishes (a Celery retry, ``countdown`` the lock's remaining
time) and then replays the record. JSON is the only serialiser the app accepts.

A worker refuses (``FAILED``, naming both) a job sent under another namespace than its own
site's (another site sharing the Redis), and (``STOPPED``) a job first delivered longer than
``queue_timeout`` after it was sent: its coordinator has given it up (Celery's own
``expires`` revokes it too), and the next tick makes it again if it is still due.

Each task claims its task id in Redis (``<namespace>:claim:<task id>``, ``SET NX``) before it
runs: ``started``. A coordinator that gives up on a job no worker took (``queue_timeout``)
claims it ``abandoned`` first, so such a job, delivered later to a worker that comes up, is
not run: exactly one of the two wins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from regionvault.core.errors import RegionVaultError, TransientError
from regionvault.core.pipeline.executor import DEFAULT_RETRY, execute_job
from regionvault.core.pipeline.jobs import Job, JobOutcome, JobStatus, runs_in
from regionvault.core.pipeline.ledger import runner_name
from regionvault.plugins.celery.ledger import RedisLedger
from regionvault.plugins.celery.settings import CelerySettings

if TYPE_CHECKING:
    from regionvault.core.pipeline import Engine
    from regionvault.core.pipeline.jobs import JobHandlers
    from regionvault.core.site import Site

__all__ = [
    "ABANDONED",
    "STARTED",
    "TASK",
    "WorkerContext",
    "make_app",
    "serve_region",
]

log = logging.getLogger(__name__)

#: the one task's name
TASK = "regionvault.run_job"
#: the claims of a task id (see the module's docstring)
STARTED, ABANDONED = "started", "abandoned"
#: how long a claim is kept (far longer than any job waits or runs)
CLAIM_TTL = timedelta(days=7)
#: how long outcomes are kept in the result backend
RESULT_EXPIRES = timedelta(days=1)
#: how often a delivery that found its key held comes back (each after the holder's lock
#: would expire): enough for a holder renewing its lock through the longest job
BUSY_RETRIES = 1000
#: how often a job whose ledger (Redis) failed for a moment is sent again, with backoff
LEDGER_RETRIES = 5


def make_app(settings: CelerySettings) -> Celery:
    """The Celery app of ``settings``, with :data:`TASK` registered."""
    app = Celery("regionvault", broker=settings.broker_url(), backend=settings.backend_url())
    visibility = int(settings.visibility_timeout.total_seconds())
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=RESULT_EXPIRES,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # look for jobs left unacknowledged by a dead worker every tenth of the timeout
            # (kombu's default looks every 100 s)
            "unacked_restore_interval": max(1, min(60, visibility // 10)),
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": visibility},
        enable_utc=True,
    )
    app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True)(_run_job)
    return app


@dataclass
class _Opened:
    site: Site
    engine: Engine
    handlers: JobHandlers
    ledger: RedisLedger


class WorkerContext:
    """What a worker of ``region`` runs jobs with: its site file (``site_path``), opened
    once per process on its first job (so after a prefork pool's fork), with the site's
    shared ledger."""

    def __init__(self, site_path: Path, region: str, settings: CelerySettings) -> None:
        self.site_path = site_path
        self.region = region
        self.settings = settings
        self._opened: dict[int, _Opened] = {}
        self._lock = threading.Lock()

    def opened(self) -> _Opened:
        with self._lock:
            here = self._opened.get(os.getpid())
            if here is None:
                from regionvault.core.pipeline import Engine, job_handlers
                from regionvault.core.site import Site

                site = Site.load(self.site_path)
                engine = Engine(site)
                ledger = RedisLedger(
                    self.settings.broker_url(),
                    namespace=self.settings.namespace,
                    lock_ttl=self.settings.lock_ttl,
                )
                ledger.warn_if_evicting()
                here = _Opened(site, engine, job_handlers(engine), ledger)
                self._opened[os.getpid()] = here
            return here

    def close(self) -> None:
        with self._lock:
            opened = self._opened.pop(os.getpid(), None)
        if opened is not None:
            opened.ledger.close()
            opened.site.close()


#: the context of this process's worker (set by :func:`serve_region`)
_worker: WorkerContext | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _outcome(job: Job, status: JobStatus, error: str) -> JobOutcome:
    return JobOutcome(
        job.key,
        job.kind,
        job.region,
        status,
        error=error,
        started_at=_now(),
        finished_at=_now(),
        runner=runner_name(),
        attempts=0,
    )


def _reply(task: Task[Any, Any], outcome: JobOutcome, problems: list[str]) -> dict[str, Any]:
    return {"outcome": outcome.to_dict(), "problems": problems, "worker": task.request.hostname}


def _run_job(
    task: Task[Any, Any],
    data: dict[str, Any],
    namespace: str | None = None,
    sent_at: float | None = None,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    job = Job.from_dict(data)
    context = _worker
    if context is None:
        raise RegionVaultError(f"{TASK} runs in `regionvault worker` only")
    mine = context.settings.namespace
    if namespace != mine:
        outcome = _outcome(
            job,
            JobStatus.FAILED,
            f"RegionVaultError: job {job.key} was sent by the site of namespace "
            f"{namespace!r}, but reached a worker of namespace {mine!r} (two sites sharing a "
            "Redis each have their own queues; a worker runs its own site's jobs only)",
        )
        return _reply(task, outcome, [])
    retries = int(task.request.retries or 0)
    waited = time.time() - sent_at if sent_at is not None else 0.0
    if retries == 0 and waited > context.settings.queue_timeout.total_seconds():
        outcome = _outcome(
            job,
            JobStatus.STOPPED,
            f"not run: it was sent {waited:.0f}s ago, longer than queue_timeout "
            f"({context.settings.queue_timeout}), so its coordinator has given it up",
        )
        return _reply(task, outcome, [])
    region = runs_in(job)
    if region != context.region:
        outcome = _outcome(
            job,
            JobStatus.FAILED,
            f"RegionVaultError: job {job.key} runs in {region}, but reached a worker of "
            f"{context.region} (a worker consumes its own region's queue only)",
        )
        return _reply(task, outcome, [])
    kept = list(problems or [])
    again = {"namespace": namespace, "sent_at": sent_at}
    try:
        opened = context.opened()
        claimed = opened.ledger.claim(str(task.request.id), STARTED, ttl=CLAIM_TTL)
        if claimed == ABANDONED:
            outcome = _outcome(
                job,
                JobStatus.STOPPED,
                "not run: the coordinator stopped waiting for it before a worker took it",
            )
            return _reply(task, outcome, [])
        outcome = execute_job(
            job,
            opened.handlers,
            opened.ledger,
            plugin_manager=opened.site.plugin_manager,
            retry=DEFAULT_RETRY,
        )
        kept += opened.engine.take_hook_problems()
        if outcome.status is JobStatus.BUSY and retries < BUSY_RETRIES:
            # another runner holds the key: come back when its lock would expire (a killed
            # holder's), or to replay its record (a live one's, done by then or renewed)
            holder = opened.ledger.holder(job.key) or {}
            left = float(holder.get("expires_at") or time.time()) - time.time()
            ttl = context.settings.lock_ttl.total_seconds()
            # the hook problems taken so far go along, so the last reply reports them
            raise task.retry(
                args=[data],
                kwargs={**again, "problems": kept},
                countdown=min(max(left + 0.2, 0.2), ttl + 1),
                max_retries=None,
                expires=None,  # a retry is no stale delivery: it waits for a live holder
            )
        return _reply(task, outcome, kept)
    except TransientError as exc:
        # the ledger (Redis) failed for a moment: send the job again, with backoff
        if retries < LEDGER_RETRIES:
            log.warning("job %s: the ledger failed, retrying: %s", job.key, exc)
            raise task.retry(
                args=[data],
                kwargs={**again, "problems": kept},
                countdown=DEFAULT_RETRY.wait(retries + 1, exc),
                max_retries=None,
                expires=None,
            ) from exc
        outcome = _outcome(job, JobStatus.FAILED, f"TransientError: {exc}")
        return _reply(task, outcome, kept)
    except RegionVaultError as exc:
        # the ledger refused (credentials, a Redis out of memory): a failure with its cause,
        # recorded when the ledger still takes a write, and reported to the coordinator
        outcome = _outcome(job, JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
        try:
            context.opened().ledger.mark_failed(outcome)
        except RegionVaultError as unrecorded:
            log.error("job %s: could not record its failure: %s", job.key, unrecorded)
        return _reply(task, outcome, kept)


def serve_region(
    site_path: Path,
    region: str,
    settings: CelerySettings,
    *,
    concurrency: int,
    pool: str,
    name: str,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker of ``region`` (until it is stopped: SIGTERM finishes the jobs in
    hand, then exits) consuming that region's queue of its site (``namespace``) alone."""
    from regionvault.plugins.celery.settings import queue_of

    global _worker
    _worker = WorkerContext(site_path, region, settings)
    app = make_app(settings)
    try:
        app.worker_main(
            [
                "worker",
                "--queues",
                queue_of(region, settings.namespace),
                "--hostname",
                name,
                "--concurrency",
                str(concurrency),
                "--pool",
                pool,
                "--loglevel",
                loglevel,
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        _worker.close()
        _worker = None
