""":class:`CeleryExecutor`: the pipeline's jobs on Celery workers, one queue per region.

``submit(job)`` sends task ``regionvault.run_job`` with ``job.to_dict()`` to the queue of
the region :func:`~regionvault.core.pipeline.jobs.runs_in` names
(``<namespace>.region.<region>``), with ``expires`` at ``queue_timeout`` (a delivery later
than that is revoked by Celery, and refused by the worker), and returns a future of the
job's outcome. One thread of the executor polls the result backend
for every job in flight (one ``MGET`` a round), so a tick of a thousand jobs holds one
thread, not a thousand.

A job no worker of its region has taken within ``queue_timeout`` is given up: the executor
claims its task id ``abandoned`` (a worker that takes it later skips it) and its outcome is
``FAILED``, naming the queue, with ``result={"reason": "no-worker", "queue": ...}``, so a
region whose workers are all down fails its own jobs and delays no other region's (the
service lets such a region sit out the rest of its tick). A job a worker has started is
waited for, within bounds:

- a started job whose key's lock has been absent for longer than ``lock_ttl`` while it has
  neither an outcome nor a record, and whose message the broker no longer holds (neither
  queued nor unacknowledged: its worker died and Redis lost the message in a restart
  without persistence, or a failover) is given up as ``FAILED`` ("lost"): the next tick
  makes it again, and the ledger runs it once (a dead worker's message still held
  unacknowledged is waited for: it is delivered again after ``visibility_timeout``);
- every job is given up (``FAILED``) once ``run_timeout`` has passed since it was sent;
- deadlines are checked even while the result backend cannot be read (the job then cannot
  be claimed ``abandoned``; it is idempotent, so a worker that takes it later does no harm),
  and that failure is logged once every :data:`WARN_EVERY` seconds, not every poll.

Setting ``stop`` gives up on every job not started yet (``STOPPED``); those already started
are still waited for, as the thread executor lets running jobs finish.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from celery import states
from regionvault.core.pipeline.executor import DEFAULT_RETRY
from regionvault.core.pipeline.jobs import Job, JobOutcome, JobStatus, runs_in
from regionvault.core.pipeline.service import NO_WORKER
from regionvault.plugins.celery.app import ABANDONED, CLAIM_TTL, TASK, make_app
from regionvault.plugins.celery.ledger import RedisLedger
from regionvault.plugins.celery.settings import CelerySettings, queue_of

__all__ = ["CeleryExecutor"]

log = logging.getLogger(__name__)

#: seconds between two looks at the result backend
POLL = 0.05
#: seconds between two warnings that the result backend cannot be read
WARN_EVERY = 30.0


@dataclass
class _InFlight:
    task_id: str
    job: Job
    queue: str
    future: Future[JobOutcome]
    deadline: float
    #: when the job is given up whatever befalls it (``run_timeout``)
    last: float
    started: bool = False
    sent_at: float = field(default_factory=time.monotonic)
    #: since when a started job's lock has been seen absent with no record (None: present)
    lock_gone: float | None = None
    #: when its lock was last looked at
    looked: float = 0.0
    #: its worker sent it again (Celery's RETRY): it may wait out a ledger backoff unlocked
    retrying: bool = False


def _now() -> datetime:
    return datetime.now(UTC)


class CeleryExecutor:
    """An :class:`~regionvault.core.pipeline.executor.Executor` whose jobs run on the Celery
    workers of each job's region (``regionvault worker --region R``), over ``settings``
    (``[executor]``); ``ledger`` is the site's shared one (for claims). ``problems`` is
    given the hook problems a worker reports with an outcome (the coordinating engine's,
    so that the tick reports them); ``stop`` set gives up on the jobs not started."""

    distributed = True

    def __init__(
        self,
        settings: CelerySettings,
        ledger: RedisLedger,
        *,
        stop: threading.Event | None = None,
        problems: Any = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.stop = stop
        self.problems = problems
        self.app = make_app(settings)
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"CeleryExecutor({self.ledger.where!r})"

    # ---- Executor

    def submit(self, job: Job) -> Future[JobOutcome]:
        future: Future[JobOutcome] = Future()
        try:
            region = runs_in(job)
        except Exception as exc:
            future.set_result(self._given_up(job, JobStatus.FAILED, f"{type(exc).__name__}: {exc}"))
            return future
        if region is None:
            future.set_result(
                self._given_up(job, JobStatus.FAILED, "names no region, so it has no queue")
            )
            return future
        queue = queue_of(region, self.settings.namespace)
        task_id = uuid.uuid4().hex
        wait = self.settings.queue_timeout.total_seconds()
        try:
            self.app.send_task(
                TASK,
                args=[job.to_dict()],
                kwargs={"namespace": self.settings.namespace, "sent_at": time.time()},
                queue=queue,
                task_id=task_id,
                expires=wait,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            future.set_result(
                self._given_up(
                    job,
                    JobStatus.FAILED,
                    f"could not send it to queue {queue} at {self.ledger.where}: "
                    f"{type(exc).__name__}: {exc}",
                )
            )
            return future
        now = time.monotonic()
        last = now + self.settings.job_timeout.total_seconds()
        with self._lock:
            self._inflight[task_id] = _InFlight(task_id, job, queue, future, now + wait, last)
            if self._poller is None:
                self._poller = threading.Thread(
                    target=self._poll_loop, name="regionvault-celery-results", daemon=True
                )
                self._poller.start()
        return future

    def run(self, jobs: Iterable[Job]) -> list[JobOutcome]:
        futures = [self.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._closed.set()
        if self._poller is not None:
            self._poller.join()
        with self._lock:
            left = list(self._inflight.values())
            self._inflight.clear()
        for item in left:
            if not item.future.done():
                item.future.set_result(
                    self._given_up(item.job, JobStatus.STOPPED, "the executor was closed")
                )
        self.app.close()

    def __enter__(self) -> CeleryExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- results

    def _given_up(self, job: Job, status: JobStatus, error: str) -> JobOutcome:
        return JobOutcome(
            job.key, job.kind, job.region, status, error=error, finished_at=_now(), attempts=0
        )

    def _poll_loop(self) -> None:
        failing = 0
        warned = -math.inf
        while not self._closed.wait(POLL):
            try:
                self._poll_once()
                if failing:
                    log.warning(
                        "reading job outcomes from %s works again (%d rounds failed)",
                        self.ledger.where,
                        failing,
                    )
                failing = 0
            except Exception as exc:
                # the result backend unreachable for a moment: the next round tries again,
                # and meanwhile the deadlines still hold
                failing += 1
                now = time.monotonic()
                if now - warned >= WARN_EVERY:
                    warned = now
                    log.warning(
                        "reading job outcomes from %s failed (%d rounds so far; told again "
                        "in %.0fs at most): %s: %s",
                        self.ledger.where,
                        failing,
                        WARN_EVERY,
                        type(exc).__name__,
                        exc,
                    )
                self._check_deadlines_blind(now)

    def _check_deadlines_blind(self, now: float) -> None:
        """Give up on the jobs past their deadlines while nothing can be read."""
        stopping = self.stop is not None and self.stop.is_set()
        with self._lock:
            items = list(self._inflight.items())
        for task_id, item in items:
            if now >= item.last:
                self._finish(task_id, self._timed_out(item))
            elif not item.started and (stopping or now >= item.deadline):
                try:
                    self._maybe_abandon(task_id, item, stopping)
                except Exception:
                    # Redis cannot be reached to claim it: give it up all the same; should a
                    # worker take it later, its key is idempotent (the ledger runs it once)
                    outcome = self._no_worker(item, stopping, claimed=False)
                    log.error("job %s: %s", item.job.key, outcome.error)
                    self._finish(task_id, outcome)

    def _timed_out(self, item: _InFlight) -> JobOutcome:
        outcome = self._given_up(
            item.job,
            JobStatus.FAILED,
            f"no outcome within run_timeout ({self.settings.job_timeout}) of sending it to "
            f"{item.queue}; given up, the next tick makes it again",
        )
        log.error("job %s: %s", item.job.key, outcome.error)
        return outcome

    def _poll_once(self) -> None:
        with self._lock:
            items = list(self._inflight.items())
        if not items:
            return
        backend: Any = self.app.backend
        keys = [backend.get_key_for_task(task_id) for task_id, _ in items]
        values = backend.mget(keys)
        now = time.monotonic()
        stopping = self.stop is not None and self.stop.is_set()
        for (task_id, item), raw in zip(items, values, strict=True):
            meta = backend.decode_result(raw) if raw is not None else None
            status = meta.get("status") if isinstance(meta, dict) else None
            if status == states.SUCCESS and isinstance(meta, dict):
                self._finish(task_id, self._outcome_of(item, meta))
            elif status == states.FAILURE:
                result = meta.get("result") if isinstance(meta, dict) else None
                what = (
                    f"{result.get('exc_type')}: {result.get('exc_message')}"
                    if isinstance(result, dict)
                    else str(result)
                )
                self._finish(
                    task_id, self._given_up(item.job, JobStatus.FAILED, f"the task raised {what}")
                )
            elif status == states.REVOKED:
                # expired (``expires``) before a worker took it: not run
                self._finish(task_id, self._no_worker(item, False, claimed=True))
            elif now >= item.last:
                self._finish(task_id, self._timed_out(item))
            elif status in (states.STARTED, states.RETRY) or item.started:
                item.started = True
                item.retrying = status == states.RETRY
                self._check_lost(task_id, item, now)
            elif stopping or now >= item.deadline:
                self._maybe_abandon(task_id, item, stopping)

    def _check_lost(self, task_id: str, item: _InFlight, now: float) -> None:
        """Give up on a started job whose lock has been gone, with no record, for longer
        than ``lock_ttl``: its worker died and its message was lost with Redis."""
        ttl = self.settings.lock_ttl.total_seconds()
        if now - item.looked < min(ttl / 4, 1.0):
            return
        item.looked = now
        if self.ledger.holder(item.job.key) is not None or self.ledger.record(item.job.key):
            item.lock_gone = None
            return
        if item.lock_gone is None:
            item.lock_gone = now
            return
        # a delivery sent again after the ledger failed holds no lock while it waits out its
        # backoff (at most the retry policy's max_delay)
        grace = ttl + (DEFAULT_RETRY.max_delay if item.retrying else 0.0)
        if now - item.lock_gone <= grace:
            return
        if self.ledger.holds_message(item.task_id, item.queue):
            # its worker died, but the broker delivers it again (visibility_timeout): wait
            item.lock_gone = now
            return
        outcome = self._given_up(
            item.job,
            JobStatus.FAILED,
            f"lost: a worker of {item.queue} started it, but for longer than lock_ttl "
            f"({self.settings.lock_ttl}) its key has had no lock, no record and no outcome "
            "(its worker died and the queue lost the message); given up, the next tick "
            "makes it again",
        )
        log.error("job %s: %s", item.job.key, outcome.error)
        self._finish(task_id, outcome)

    def _maybe_abandon(self, task_id: str, item: _InFlight, stopping: bool) -> None:
        """Give up on a job no worker has started, unless one starts it first."""
        if self.ledger.claim(task_id, ABANDONED, ttl=CLAIM_TTL) != ABANDONED:
            item.started = True  # a worker took it just now: wait for it
            return
        outcome = self._no_worker(item, stopping, claimed=True)
        log.error("job %s: %s", item.job.key, outcome.error)
        self._finish(task_id, outcome)

    def _no_worker(self, item: _InFlight, stopping: bool, *, claimed: bool) -> JobOutcome:
        if stopping:
            return self._given_up(
                item.job, JobStatus.STOPPED, f"stopped before a worker of {item.queue} took it"
            )
        waited = self.settings.queue_timeout
        region = item.queue.partition(".region.")[2]
        outcome = self._given_up(
            item.job,
            JobStatus.FAILED,
            f"no worker of queue {item.queue} took it within {waited} "
            f"(is `regionvault worker --region {region}` running?); "
            + ("not run" if claimed else "whether a worker takes it later cannot be told")
            + ", the next tick makes it again",
        )
        return replace(outcome, result={"reason": NO_WORKER, "queue": item.queue})

    def _outcome_of(self, item: _InFlight, meta: dict[str, Any]) -> JobOutcome:
        reply = meta.get("result")
        try:
            outcome = JobOutcome.from_dict(reply["outcome"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            return self._given_up(
                item.job, JobStatus.FAILED, f"the worker's reply cannot be read: {exc}"
            )
        problems = reply.get("problems") if isinstance(reply, dict) else None
        if problems and self.problems is not None:
            worker = reply.get("worker") if isinstance(reply, dict) else None
            self.problems([f"on worker {worker}: {p}" for p in problems])
        return outcome

    def _finish(self, task_id: str, outcome: JobOutcome) -> None:
        with self._lock:
            item = self._inflight.pop(task_id, None)
        if item is not None and not item.future.done():
            item.future.set_result(outcome)
