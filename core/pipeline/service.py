"""The backup service: ticks that find what is due and run it as jobs on any executor.

:class:`Service` runs a whole-site tick (:meth:`Service.tick`), one region's own tick
(:meth:`Service.region_tick`) and the loop of ticks (:meth:`Service.run`). Every step is an
idempotent job (core/pipeline/jobs.py) handed to an :class:`Executor`: by default a
:class:`ThreadExecutor` in this process, or any other (a distributed one) given to it;
:func:`job_handlers` is the function each job kind runs, the same wherever it runs. After each
job the service calls ``regionvault_after_job(outcome)``, after each tick
``regionvault_after_tick(report)``. See docs/jobs.md.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import RegionVaultError
from regionvault.core.pipeline.claims import compute_scopes, refuse_claimed_twice, without_refused
from regionvault.core.pipeline.copyflow import CopyFlow
from regionvault.core.pipeline.drills import drill_jobs, plan_drills, run_drill
from regionvault.core.pipeline.engine import SLOT_TAG
from regionvault.core.pipeline.executor import DEFAULT_RETRY, Executor, RetryPolicy, ThreadExecutor
from regionvault.core.pipeline.jobs import (
    BACKUP,
    COPY,
    DRILL,
    LISTED_ISSUES,
    PLAN_BACKUPS,
    PLAN_DRILLS,
    PLAN_INBOX,
    PLAN_OFFERS,
    RETENTION,
    TAG,
    Incomplete,
    Job,
    JobHandlers,
    JobOutcome,
    JobStatus,
    copy_job,
    copy_jobs_for,
    parse_slot,
    plan_job,
    retention_job,
    runs_in,
    slot_of,
    tag_job,
)
from regionvault.core.pipeline.locks import (
    LockFailed,
    describe_protection,
    heal_locks,
    heal_since,
    record_heal,
)
from regionvault.core.pipeline.reports import TickReport
from regionvault.core.pipeline.scheduler import ScheduleReport, due_instances

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine, PointsView
    from regionvault.core.types import Instance

__all__ = [
    "MAX_PASSES",
    "NO_WORKER",
    "Service",
    "is_distributed",
    "job_handlers",
    "newest_slot",
    "run_chains",
]

log = logging.getLogger(__name__)

#: a distributed tick repeats its inbox and offer rounds at most this often: enough for one
#: copy to go through every phase (offer, request, send, commit, receipt) and a pass more to
#: find nothing left; it stops sooner when a pass makes no new job
MAX_PASSES = 6


def is_distributed(executor: Executor | None) -> bool:
    """Whether ``executor`` runs each job where :func:`~regionvault.core.pipeline.jobs.runs_in`
    says, on workers holding that region's credentials alone (``executor.distributed`` is
    true): then a tick plans as jobs too, and the process that ticks opens no region."""
    return getattr(executor, "distributed", False) is True


def newest_slot(
    engine: Engine, instance: Instance, view: PointsView | None = None
) -> datetime | None:
    """The schedule slot of ``instance``'s newest recovery point in its home region (its
    creation time when it has none), None when it has no point there. With ``view`` (a
    planning step's :meth:`Engine.points_view`), from its listing of the region."""
    point = (view or engine).newest_point(instance)
    if point is None:
        return None
    slot = point.tags.get(SLOT_TAG)
    return parse_slot(slot) if slot else point.created_at


def _plan_handlers(engine: Engine) -> dict[str, Callable[[Job], Any]]:
    """The plan jobs of a distributed tick: each runs in its region, calls what a region's
    own tick calls there (the scheduler, the copy flow), and returns the jobs of the next
    round and what the tick reports (the schedule, problems) as plain JSON data."""
    flow = CopyFlow(engine)

    def where(job: Job) -> tuple[str, datetime, datetime]:
        here = engine.region(job.region or "").name
        try:
            at = parse_slot(str(job.payload["at"]))
        except KeyError:
            raise RegionVaultError(f"job {job.key}: payload lacks 'at'") from None
        return here, at, slot_of(at, engine.site.config.schedule_interval)

    def schedule_of(here: str, at: datetime, view: PointsView) -> ScheduleReport:
        region = engine.region(here)
        return due_instances(
            region.compute, lambda i: newest_slot(engine, i, view), engine.site.config, at
        )

    def plan_backups(job: Job) -> Any:
        here, at, _ = where(job)
        try:
            schedule = schedule_of(here, at, engine.points_view())
        except RegionVaultError as exc:
            return {"jobs": [], "schedule": None, "problems": [f"{here}: schedule: {exc}"]}
        return {
            "jobs": [j.to_dict() for j in schedule.jobs()],
            "schedule": schedule.to_dict(),
            "problems": [],
        }

    def plan_inbox(job: Job) -> Any:
        here, at, slot = where(job)
        scratch = TickReport(at=at, region=here)
        first, then = flow.inbox_jobs(here, slot, scratch)
        return {
            "first": [j.to_dict() for j in first],
            "then": [j.to_dict() for j in then],
            "problems": scratch.problems,
        }

    def plan_offers(job: Job) -> Any:
        here, at, slot = where(job)
        scratch = TickReport(at=at, region=here)
        # one listing of the region answers the schedule and the offers alike
        view = engine.points_view()
        try:
            scratch.schedule.append(schedule_of(here, at, view))
        except RegionVaultError as exc:
            # the region's own tick offers nothing then either; the tick says why
            return {"jobs": [], "problems": [f"{here}: schedule: {exc}"]}
        jobs = flow.offer_jobs(here, slot, scratch, view)
        return {"jobs": [j.to_dict() for j in jobs], "problems": scratch.problems}

    def plan_region_drills(job: Job) -> Any:
        here, at, _ = where(job)
        return plan_drills(engine, here, at).to_dict()

    return {
        PLAN_BACKUPS: plan_backups,
        PLAN_INBOX: plan_inbox,
        PLAN_OFFERS: plan_offers,
        PLAN_DRILLS: plan_region_drills,
    }


#: how long the ledger keeps a finished job's record: the retention job drops older ones
LEDGER_KEEP = timedelta(days=30)


def _prune_ledger(engine: Engine) -> int | str | None:
    """Drop the ledger's records older than :data:`LEDGER_KEEP` (a ledger without ``prune``
    is left alone: None). A failure is logged and said in the result, never the retention
    job's failure: its vault's retention is done."""
    try:
        ledger = engine.ledger()
        prune = getattr(ledger, "prune", None)
        if prune is None:
            return None
        # the wall clock, as the records' times are (not the engine's clock)
        return int(prune(older_than=datetime.now(UTC) - LEDGER_KEEP))
    except (OSError, RegionVaultError) as exc:
        log.warning("pruning the job ledger failed: %s", exc)
        return f"failed: {exc}"


def job_handlers(engine: Engine) -> JobHandlers:
    """The function that runs each kind of job over ``engine``: the thread executor uses
    these, and so does any other executor's worker (docs/jobs.md)."""
    flow = CopyFlow(engine)

    def run_tag(job: Job) -> Any:
        report = engine.tag(job.region or "")
        return {
            "tagged": [t.instance_id for t in report.tagged],
            "malformed": [str(m) for m in report.malformed],
            "completed": [str(c) for c in report.completed],
        }

    def run_backup(job: Job) -> Any:
        instance = engine.region(job.region or "").compute.get_instance(job.payload["instance_id"])
        point = engine.backup(instance, slot=parse_slot(job.payload["slot"]))
        result = {"point": point.id}
        if point.issues:
            # done for its slot all the same (the point exists), and saying so
            listed = engine.point_issues(point)[:LISTED_ISSUES]
            return Incomplete({**result, "issues": point.issues}, listed, point.issues)
        return result

    def run_copy(job: Job) -> Any:
        source = engine.region(job.region or "").name
        destination = engine.region(str(job.payload["destination"])).name
        point_id = str(job.payload["recovery_point"])
        flow.check_allowed(job, source, destination, lambda: engine.find_point(point_id, source))
        result = engine.copy(
            job.payload["recovery_point"], source=job.region, to=job.payload["destination"]
        )
        return {
            "copy": result.point.id,
            "existing": result.existing,
            "bytes_moved": result.bytes_moved,
        }

    def run_retention(job: Job) -> Any:
        # first, the locks a killed run left unapplied, so forget and prune see them
        region = engine.region(job.region or "").name
        # (every point committed since the last complete heal, less a margin: docs/policies.md)
        state_dir = engine.state.root
        started = datetime.now(UTC)  # the vault's commit times are the wall clock's
        healed = heal_locks(
            lambda: engine.repository(region, create=False),
            since=heal_since(state_dir, region),
        )
        if healed is not None and not healed.failed:
            record_heal(state_dir, region, started)
        report = engine.retain(region)
        result: dict[str, Any] = {"forgotten": report.forgotten, "protected": report.protected}
        if report.protected:
            repo = engine.repository(region, create=False)
            result["kept"] = {
                p: f"kept: {describe_protection(repo.point_object(p)) or 'protected'}"
                for p in report.protected
            }
        if healed is not None and healed.locked:
            result["locks_applied"] = healed.locked
        if healed is not None and healed.released:
            result["locks_released_by_hand"] = healed.released
        pruned = _prune_ledger(engine)
        if pruned is not None:
            result["ledger_pruned"] = pruned
        if healed is not None and healed.failed:
            # a policy asks a lock that is absent: never silent (retention itself is done)
            raise LockFailed("; ".join(healed.failed), region=region)
        return result

    return JobHandlers(
        {
            TAG: run_tag,
            BACKUP: run_backup,
            COPY: run_copy,
            RETENTION: run_retention,
            DRILL: lambda job: run_drill(engine, job),
            **flow.handlers(),
            **_plan_handlers(engine),
        }
    )


#: ``result["reason"]`` of a job an executor gave up because no worker of its region took it
#: (its ``result["queue"]`` names the queue): that region sits out the rest of the tick
NO_WORKER = "no-worker"


def _region_of(job: Job) -> str | None:
    """The region whose workers run ``job`` (:func:`runs_in`; its own region when that
    cannot be told)."""
    try:
        return runs_in(job)
    except RegionVaultError:
        return job.region


def run_chains(executor: Executor, chains: Iterable[list[Job]]) -> list[JobOutcome]:
    """Run chains of jobs (such as :func:`~regionvault.core.pipeline.jobs.copy_jobs_for`'s) through
    ``executor``, one step of every chain at a time: a chain goes on only while its jobs
    succeed (a failed or busy step stops it until the next run). Returns every outcome."""
    live = [list(chain) for chain in chains]
    outcomes: list[JobOutcome] = []
    step = 0
    while live:
        current = [chain for chain in live if step < len(chain)]
        if not current:
            break
        results = executor.run([chain[step] for chain in current])
        outcomes.extend(results)
        live = [chain for chain, outcome in zip(current, results, strict=True) if outcome.ok]
        step += 1
    return outcomes


class Service:
    """Ticks over ``engine``'s site, every job run by ``executor``.

    >>> service = Service(Engine(site))                      # doctest: +SKIP
    >>> report = service.tick()                              # doctest: +SKIP
    >>> east = Service(Engine(site), executor=my_executor).region_tick("east")  # doctest: +SKIP

    With no ``executor``, each tick runs its jobs in a :class:`ThreadExecutor` of
    ``engine.workers`` threads, made for the tick and closed at its end. A given executor is
    used for every tick as it is, and never closed here: whoever made it closes it. Whatever
    the executor, every job of a tick goes through its :meth:`Executor.run`.

    ``retry`` is how that default executor retries a job that failed transiently (throttled,
    a server error, a timeout: :class:`~regionvault.core.pipeline.executor.RetryPolicy`); a
    given executor has its own, so the two are not taken together.

    The engine's ``split_copies`` and ``copy_grace`` say how a tick copies (docs/jobs.md).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        executor: Executor | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if executor is not None and retry is not None:
            raise RegionVaultError(
                "Service takes an executor or a retry policy, not both: the executor given "
                "retries as it was made to"
            )
        self.engine = engine
        self.executor = executor
        self.retry = retry if retry is not None else DEFAULT_RETRY
        self.copyflow = CopyFlow(engine)
        #: set (by ``tick``'s first Ctrl-C): each tick stops before its next step; a step's
        #: jobs already running finish, so whatever they committed stays whole and the next
        #: tick does the steps left (:meth:`_step`). :meth:`run`'s ``stop`` does not set it:
        #: there the tick in progress finishes whole (its copies, drills and retention too)
        #: and no next one starts. A distributed tick (:meth:`_distributed_tick`) looks at it
        #: between its rounds alike: no plan job nor round starts once it is set.
        self.halt: threading.Event | None = None
        #: called with a step's name and its number of jobs before the step runs
        self.on_step: Callable[[str, int], None] | None = None

    def _step(
        self,
        report: TickReport,
        name: str,
        jobs: Iterable[Any],
        run: Callable[[list[Any]], list[JobOutcome]],
    ) -> list[JobOutcome]:
        """``run(jobs)``, one step of the tick, unless :attr:`halt` is set: then none runs
        and the report's notes name the step as not run (the next tick runs it)."""
        jobs = list(jobs)
        if self.halt is not None and self.halt.is_set():
            if jobs:
                report.notes.append(f"stopped before {name}: {len(jobs)} job(s) not run")
            return []
        if jobs:
            log.info("tick: %s: %d job(s)", name, len(jobs))
            if self.on_step is not None:
                self.on_step(name, len(jobs))
        return run(jobs)

    def handlers(self) -> JobHandlers:
        """:func:`job_handlers` of this service's engine."""
        return job_handlers(self.engine)

    @contextmanager
    def _executor(self, stop: threading.Event | None) -> Iterator[Executor]:
        if self.executor is not None:
            yield self.executor
            return
        with ThreadExecutor(
            self.handlers(),
            self.engine.ledger(),
            max_workers=self.engine.workers,
            plugin_manager=self.engine.site.plugin_manager,
            retry=self.retry,
            stop=stop,
        ) as executor:
            yield executor

    def _call(self, name: str, about: str, **kwargs: Any) -> str | None:
        """Call the plugin hook ``name``; what it raised, in one line, or None. A hook that
        raises does not stop the tick (its other jobs still run)."""
        try:
            getattr(self.engine.site.plugin_manager.hook, name)(**kwargs)
        except Exception as exc:
            log.exception("%s hook failed for %s", name, about)
            return f"{type(exc).__name__}: {exc}"
        return None

    def _ran(self, report: TickReport, outcomes: Iterable[JobOutcome]) -> None:
        """Add a round's outcomes to ``report``, calling ``regionvault_after_job`` for each.
        A raising hook does not go unseen: it is one problem of the tick per round (naming
        the first job and how many more), with what the engine's notification hooks raised
        in the round (:meth:`Engine.notify`)."""
        failed: list[tuple[str, str]] = []
        for outcome in outcomes:
            report.jobs.append(outcome)
            error = self._call("regionvault_after_job", f"job {outcome.key}", outcome=outcome)
            if error is not None:
                failed.append((outcome.key, error))
        if failed:
            key, error = failed[0]
            more = f" and {len(failed) - 1} more job(s)" if len(failed) > 1 else ""
            report.problems.append(
                f"regionvault_after_job hook failed for job {key}{more}: {error}"
            )
        report.problems.extend(self.engine.take_hook_problems())

    def _finish(self, report: TickReport) -> TickReport:
        """Call ``regionvault_after_tick``; what it raises is added to the report after it
        returned (so the report it was given does not show its own failure)."""
        report.problems.extend(self.engine.take_hook_problems())
        where = f"the tick of {report.region}" if report.region else "the tick"
        error = self._call("regionvault_after_tick", where, report=report)
        if error is not None:
            report.problems.append(f"regionvault_after_tick hook failed for {where}: {error}")
        return report

    def _newest_slot(self, view: PointsView) -> Callable[[Instance], datetime | None]:
        """:func:`newest_slot` of this service's engine, from ``view``."""
        return lambda instance: newest_slot(self.engine, instance, view)

    def tick(self, region: str | None = None, *, stop: threading.Event | None = None) -> TickReport:
        """One pass: tag every region, back up what is due, copy new points where their
        policies say, apply retention. Each step is a job: a step already done for its
        slot is not done again.

        With ``region``, region's own tick (:meth:`region_tick`): the same for that region
        alone, with its credentials alone. On a distributed executor (:func:`is_distributed`)
        every region's own tick runs, all at once, each step and each plan a job in its
        region: this process opens no region (:meth:`_distributed_tick`). ``stop`` set ends
        the default executor's waits before retries at once
        (:func:`~regionvault.core.pipeline.executor.execute_job`); an executor given has its
        own."""
        if region is not None:
            return self.region_tick(region, stop=stop)
        engine = self.engine
        now = engine.clock()
        report = TickReport(at=now)
        cfg = engine.site.config
        if self.executor is not None and is_distributed(self.executor):
            self._distributed_tick(sorted(cfg.regions), self.executor, report)
            return self._finish(report)
        with self._executor(stop) as executor:
            tag_slot = slot_of(now, cfg.tag_interval)
            tags = [tag_job(r.name, tag_slot) for r in engine.site.regions]
            self._ran(report, self._step(report, "tag", tags, executor.run))
            backups: list[Job] = []
            view = engine.points_view()
            for r in engine.site.regions:
                try:
                    schedule = due_instances(r.compute, self._newest_slot(view), cfg, now)
                except RegionVaultError as exc:
                    report.problems.append(f"{r.name}: schedule: {exc}")
                    continue
                report.schedule.append(schedule)
                backups.extend(schedule.jobs())
            backups = self._refuse_claimed_twice(report, backups)
            self._ran(report, self._step(report, "backups", backups, executor.run))
            retain_slot = slot_of(now, cfg.schedule_interval)
            copies = self.copyflow.copies_due(report)
            if engine.split_copies:
                chains = [
                    copy_jobs_for(
                        point.region,
                        point.id,
                        dest,
                        expires_at=engine.copy_expiry(point, dest),
                        slot=retain_slot,
                    )
                    for point, dest in copies
                ]
                chained = functools.partial(run_chains, executor)
                self._ran(report, self._step(report, "copies", chains, chained))
            else:
                jobs = [copy_job(point.region, point.id, dest) for point, dest in copies]
                self._ran(report, self._step(report, "copies", jobs, executor.run))
            names = [r.name for r in engine.site.regions]
            drills = drill_jobs(engine, report, names, now, engine.points_view())
            self._ran(report, self._step(report, "drills", drills, executor.run))
            retention = [retention_job(r.name, retain_slot) for r in engine.site.regions]
            self._ran(report, self._step(report, "retention", retention, executor.run))
        return self._finish(report)

    def _refuse_claimed_twice(self, report: TickReport, backups: list[Job]) -> list[Job]:
        """``backups`` less those of an instance two regions listed (core/pipeline/claims.py):
        the schedules report it failed, the problems name it."""
        site = self.engine.site
        schedules, problems = refuse_claimed_twice(
            report.schedule, site.config, compute_scopes(site.config, site.registry)
        )
        if not problems:
            return backups
        report.schedule[:] = schedules
        report.problems.extend(problems)
        for problem in problems:
            log.warning("%s", problem)
        return without_refused(backups, schedules)

    def region_tick(self, region: str, *, stop: threading.Event | None = None) -> TickReport:
        """Region ``region``'s own tick, for a backup service running in that region with
        its own credentials alone (of the other regions: their Sealers, and write access to
        their inboxes). Each step is a job with a stable key (the schedule slot's):

        1. tag its untagged instances; back up its due instances;
        2. take in what its inbox holds from each other region: a destination's receipt
           (``copy-receipt``: recorded in its own vault), a sent notice (``copy-commit``:
           commit the copy, answer with a receipt), a request (``copy-send``: send the
           chunks, then a sent notice), an offer (``copy-request``; or a receipt when it
           holds the copy already);
        3. offer the newest point of each of its instances to every region its policy copies
           to (``copy-offer``), unless a receipt says the destination holds it, or it was
           offered less than ``copy_grace`` ago;
        4. apply retention to its vault.

        The other regions' ticks do their sides of each copy; one round of alternating
        ticks moves a copy one phase on (docs/jobs.md, "One service per region")."""
        here = self.engine.region(region)
        now = self.engine.clock()
        report = TickReport(at=now, region=here.name)
        cfg = self.engine.site.config
        slot = slot_of(now, cfg.schedule_interval)
        if self.executor is not None and is_distributed(self.executor):
            self._distributed_tick([here.name], self.executor, report)
            return self._finish(report)
        with self._executor(stop) as executor:
            tags = [tag_job(here.name, slot_of(now, cfg.tag_interval))]
            self._ran(report, self._step(report, "tag", tags, executor.run))
            try:
                schedule = due_instances(
                    here.compute, self._newest_slot(self.engine.points_view()), cfg, now
                )
            except RegionVaultError as exc:
                report.problems.append(f"{here.name}: schedule: {exc}")
            else:
                report.schedule.append(schedule)
                self._ran(report, self._step(report, "backups", schedule.jobs(), executor.run))
            first, then = self.copyflow.inbox_jobs(here.name, slot, report)
            self._ran(report, self._step(report, "inbox", first, executor.run))
            self._ran(report, self._step(report, "inbox", then, executor.run))
            offers = self.copyflow.offer_jobs(here.name, slot, report)
            self._ran(report, self._step(report, "offers", offers, executor.run))
            drills = drill_jobs(self.engine, report, [here.name], now)
            self._ran(report, self._step(report, "drills", drills, executor.run))
            retention = [retention_job(here.name, slot)]
            self._ran(report, self._step(report, "retention", retention, executor.run))
        return self._finish(report)

    def _distributed_tick(self, regions: list[str], executor: Executor, report: TickReport) -> None:
        """The tick of ``regions`` (every region's own tick, all at once) on an executor
        that runs each job in its region (:func:`is_distributed`): planning too is a job
        there, so this process opens no region's services. Rounds, each one job per region
        at once: tag; ``plan-backups``, then the backups; then up to :data:`MAX_PASSES`
        passes of ``plan-inbox`` (its first, then its second round of copy jobs) and
        ``plan-offers`` (the offers), stopping at a pass that makes no new job, so that one
        tick moves a copy through every phase; retention. A job already run in this tick
        is not run again in a later pass (the next tick retries what failed)."""
        cfg = self.engine.site.config
        now = report.at
        slot = slot_of(now, cfg.schedule_interval)
        seen: set[str] = set()
        #: regions given up for lack of workers: each round would wait for them again
        out: set[str] = set()

        def sit_out(jobs: list[Job], outcomes: list[JobOutcome]) -> None:
            for job, outcome in zip(jobs, outcomes, strict=True):
                result = outcome.result if isinstance(outcome.result, dict) else {}
                if outcome.status is not JobStatus.FAILED or result.get("reason") != NO_WORKER:
                    continue
                where = _region_of(job)
                if where is None or where in out:
                    continue
                out.add(where)
                queue = result.get("queue")
                on = f" (queue {queue})" if queue else ""
                report.problems.append(
                    f"{where}: no worker took its job {job.key}{on}; the region sits out the "
                    "rest of this tick"
                )
                log.warning(
                    "%s: no worker took job %s%s; it sits out this tick", where, job.key, on
                )

        def live(jobs: Iterable[Job]) -> list[Job]:
            return [job for job in jobs if _region_of(job) not in out]

        def run(name: str, jobs: Iterable[Job]) -> int:
            """The round's jobs not run yet in this tick, as the step ``name`` (none once
            :attr:`halt` is set: :meth:`_step` notes them as not run)."""
            fresh = [job for job in live(jobs) if job.key not in seen]
            outcomes = self._step(report, name, fresh, executor.run)
            seen.update(job.key for job in fresh)
            if outcomes:
                self._ran(report, outcomes)
                sit_out(fresh, outcomes)
            return len(outcomes)

        def plan(kind: str, step: int | None = None) -> list[dict[str, Any]]:
            """Each region's plan (its outcome's result), in the order of ``regions``; a plan
            that failed is a failed job of the tick, and that region sits the round out (the
            rest of the tick, when it failed for lack of workers). None once :attr:`halt` is
            set (its jobs, planned by nobody, are the next tick's)."""
            jobs = live(plan_job(kind, r, now, step=step) for r in regions)
            if not jobs or (self.halt is not None and self.halt.is_set()):
                return []
            outcomes = executor.run(jobs)
            self._ran(report, outcomes)
            sit_out(jobs, outcomes)
            results: list[dict[str, Any]] = []
            for outcome in outcomes:
                if not outcome.ok or not isinstance(outcome.result, dict):
                    continue
                for problem in outcome.result.get("problems") or ():
                    if problem not in report.problems:
                        report.problems.append(str(problem))
                results.append(outcome.result)
            return results

        def jobs_of(results: list[dict[str, Any]], field: str) -> list[Job]:
            return [Job.from_dict(data) for result in results for data in result.get(field) or ()]

        run("tag", [tag_job(r, slot_of(now, cfg.tag_interval)) for r in regions])
        planned = plan(PLAN_BACKUPS)
        for result in planned:
            if result.get("schedule") is not None:
                report.schedule.append(ScheduleReport.from_dict(result["schedule"]))
        run("backups", self._refuse_claimed_twice(report, jobs_of(planned, "jobs")))
        for step in range(1, MAX_PASSES + 1):
            inbox = plan(PLAN_INBOX, step)
            made = run("inbox", jobs_of(inbox, "first"))
            made += run("inbox", jobs_of(inbox, "then"))
            made += run("offers", jobs_of(plan(PLAN_OFFERS, step), "jobs"))
            if not made:
                break
        drills = plan(PLAN_DRILLS)
        report.notes.extend(str(n) for result in drills for n in result.get("notes") or ())
        run("drills", jobs_of(drills, "jobs"))
        run("retention", [retention_job(r, slot) for r in regions])

    def run(
        self,
        stop: threading.Event,
        *,
        interval: timedelta | None = None,
        on_tick: Callable[[TickReport], None] | None = None,
        max_ticks: int | None = None,
        region: str | None = None,
    ) -> int:
        """Tick every ``interval`` (default: the shorter of the site's tag and schedule
        intervals) until ``stop`` is set; a tick in progress finishes first, except that a
        job waiting to retry stops waiting at once (its outcome says ``stopped``). Returns
        the number of ticks run. With ``region``, each tick is that region's own tick."""
        cfg = self.engine.site.config
        every = interval or min(cfg.tag_interval, cfg.schedule_interval)
        ticks = 0
        while not stop.is_set() and (max_ticks is None or ticks < max_ticks):
            report = self.tick(region, stop=stop)
            ticks += 1
            if on_tick is not None:
                on_tick(report)
            if stop.wait(every.total_seconds()):
                break
        return ticks
