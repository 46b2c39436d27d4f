"""Scheduled drills: restore an instance's newest copy in a destination region, launch it,
health-check it, record the RTO, and terminate it, at most once every drill interval.

An instance whose operations (core/operations.py) say ``drill = D`` is drilled in every
region that holds a copy of it: each tick plans, in each region, a ``drill`` job
(:func:`~regionvault.core.pipeline.jobs.drill_job`, key ``drill/<region>/<instance>/<slot>``,
slot ``slot_of(now, D)``) for every instance whose last drill there is at least ``D`` old (or
that has none). The job runs in that region with its credentials alone (it reads the
operations from the tags the copy recorded), and calls :meth:`Engine.restore` with
``launch=True``, which runs the health check, calls ``regionvault_after_launch`` and records
the :class:`~regionvault.core.pipeline.state.DrillRecord`; then it terminates the instance,
healthy or not. An unhealthy drill is a failed job (its record shows it, so the next tick
does not drill again before the interval); so is a drill that cannot launch (no record: the
next tick tries again).

The launched instance carries three tags (docs/operations.md): :data:`DRILL_TAG` (this
drill's own random id), :data:`DRILL_RUNNER_TAG` (the process that runs it, a
:meth:`ProcessIdentity.token`) and :data:`DRILL_UNTIL_TAG` (a time, in seconds since the
epoch, by which any drill is over). It is opted out of backups (the policy tag is ``none``)
and its operations tags are dropped. A drill killed between launch and terminate leaves its
instance running: every tick (when it plans drills) and every drill job first terminates
each instance of the region carrying :data:`DRILL_TAG` whose runner is known dead, or whose
``until`` time has passed (a runner on another host, whose liveness nobody here can tell).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.durations import format_duration
from regionvault.core.errors import PolicyError, RegionVaultError, TransientError
from regionvault.core.operations import OPERATION_KEYS
from regionvault.core.pipeline.jobs import Job, drill_job, slot_of
from regionvault.core.pipeline.objectives import point_instance
from regionvault.core.policy import resolve_policy
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import EventAction

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine, PointsView
    from regionvault.core.pipeline.reports import TickReport
    from regionvault.core.types import Instance, RecoveryPoint

__all__ = [
    "DRILL_ALLOWANCE",
    "DRILL_RUNNER_TAG",
    "DRILL_TAG",
    "DRILL_UNTIL_TAG",
    "DrillFailed",
    "DrillPlan",
    "drill_jobs",
    "drill_tags",
    "no_copy_notes",
    "plan_drills",
    "run_drill",
    "sweep_drill_instances",
]

log = logging.getLogger(__name__)

#: the operations settings a drill reads (a bad lock or objective tag does not stop it)
_DRILL_KEYS = frozenset({"drill"})

#: on a drill's launched instance: this drill's random id (16 hex digits)
DRILL_TAG = "regionvault-drill"
#: ... the process running the drill (:meth:`ProcessIdentity.token`: lowercase letters and
#: digits, as every cloud's tag and label rules allow)
DRILL_RUNNER_TAG = "regionvault-drill-runner"
#: ... the wall-clock time (whole seconds since the epoch) by which the drill is over
DRILL_UNTIL_TAG = "regionvault-drill-until"
#: how long a drill may take, besides the engine's health timeout: its restore (before the
#: launch) and its termination. A drill instance older than this whose runner nobody here can
#: judge (another host) is taken as left behind
DRILL_ALLOWANCE = timedelta(hours=12)


class DrillFailed(RegionVaultError):
    """A drill that could not launch, or launched an instance that did not become healthy
    (terminated all the same), or could not terminate it."""


@dataclass
class DrillPlan:
    """One region's drills for a tick: the jobs due, and what the tick says besides."""

    region: str
    jobs: list[Job] = field(default_factory=list)
    #: drill instances left behind and terminated now, instances not drilled and why (a
    #: malformed operations tag)
    notes: list[str] = field(default_factory=list)
    #: what went wrong outside any job (a leftover that would not terminate, bad tags)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "jobs": [j.to_dict() for j in self.jobs],
            "notes": list(self.notes),
            "problems": list(self.problems),
        }

    def add_to(self, report: TickReport) -> list[Job]:
        """Add the notes and problems to ``report``; the jobs to run."""
        report.notes.extend(self.notes)
        report.problems.extend(self.problems)
        return list(self.jobs)

    @classmethod
    def from_dict(cls, region: str, data: Any) -> DrillPlan:
        if not isinstance(data, dict):
            return cls(region)
        return cls(
            region,
            [Job.from_dict(j) for j in data.get("jobs") or ()],
            [str(n) for n in data.get("notes") or ()],
            [str(p) for p in data.get("problems") or ()],
        )


def drill_tags(engine: Engine, point: RecoveryPoint, drill_id: str) -> dict[str, str]:
    """The tags of a drill's launched instance: the point's instance's, opted out of
    backups and drills (the policy tag ``none``, no operations tags), with the drill's marks."""
    tags = dict(point_instance(point).tags)
    for tag in OPERATION_KEYS.values():
        tags.pop(tag, None)
    tags[engine.site.config.tag_key] = "none"
    until = time.time() + engine.health_timeout + DRILL_ALLOWANCE.total_seconds()
    tags[DRILL_TAG] = drill_id
    tags[DRILL_RUNNER_TAG] = ProcessIdentity.current().token()
    tags[DRILL_UNTIL_TAG] = str(int(until))
    return tags


#: the drills running in this process (their :data:`DRILL_TAG` ids): one of this process's
#: drill instances whose id is not here is left behind (its terminate failed)
_running: set[str] = set()
_running_lock = threading.Lock()


def _left_behind(instance: Instance, now: float) -> str | None:
    """Why ``instance`` (carrying :data:`DRILL_TAG`) is a drill left behind, or None while
    its drill may still run."""
    token = instance.tags.get(DRILL_RUNNER_TAG, "")
    if token == ProcessIdentity.current().token():
        with _running_lock:
            running = instance.tags.get(DRILL_TAG) in _running
        return None if running else "its drill in this process is over"
    runner = ProcessIdentity.from_token(token)
    if runner is not None and runner.alive() is False:
        return "its drill's process is gone"
    until = instance.tags.get(DRILL_UNTIL_TAG, "")
    if not until.isdigit():
        return f"its {DRILL_UNTIL_TAG} tag {until!r} is not a time"
    if int(until) < now:
        return "its drill's time is over"
    return None


def sweep_drill_instances(engine: Engine, region: str) -> tuple[list[str], list[str]]:
    """Terminate the drill instances of ``region`` left behind (by a drill killed between
    launch and terminate, or whose terminate failed): ``(notes, problems)``, a line each."""
    r = engine.region(region)
    notes: list[str] = []
    problems: list[str] = []
    now = time.time()
    for instance in list(r.compute.list_instances(tag_filters={DRILL_TAG: None})):
        why = _left_behind(instance, now)
        if why is None:
            continue
        try:
            r.compute.terminate(instance.id)
        except RegionVaultError as exc:
            problems.append(
                f"{r.name}: drill instance {instance.id} ({instance.name}) left behind "
                f"({why}) could not be terminated: {exc}"
            )
            continue
        log.warning("%s: terminated drill instance %s left behind (%s)", r.name, instance.id, why)
        notes.append(
            f"{r.name}: terminated drill instance {instance.id} ({instance.name}) left behind "
            f"({why})"
        )
    return notes, problems


def _terminate_drill(engine: Engine, region: str, drill_id: str) -> list[str]:
    """Terminate the instances of this drill (a launch that failed after its instance
    existed); what could not be, a line each."""
    r = engine.region(region)
    failed: list[str] = []
    try:
        found = list(r.compute.list_instances(tag_filters={DRILL_TAG: drill_id}))
    except RegionVaultError as exc:
        return [f"cannot list the drill's instances: {exc}"]
    for instance in found:
        try:
            r.compute.terminate(instance.id)
        except RegionVaultError as exc:
            failed.append(f"cannot terminate {instance.id}: {exc}")
    return failed


def plan_drills(engine: Engine, region: str, now: datetime) -> DrillPlan:
    """``region``'s drills due at ``now``: a job for each instance with a copy there whose
    drill interval (read from its newest copy's tags) has passed since its last drill there,
    after terminating the drill instances left behind (:func:`sweep_drill_instances`)."""
    here = engine.region(region).name
    plan = DrillPlan(here)
    try:
        plan.notes, plan.problems = sweep_drill_instances(engine, here)
    except RegionVaultError as exc:
        plan.problems.append(f"{here}: drills: cannot list drill instances: {exc}")
    try:
        points = engine.points(here)
    except RegionVaultError as exc:
        plan.problems.append(f"{here}: drills: {exc}")
        return plan
    newest: dict[str, RecoveryPoint] = {}
    for point in points:
        if point.lineage is not None:
            newest[point.instance_id] = point  # points come oldest first
    for instance_id, point in sorted(newest.items()):
        try:
            interval = engine.operations(point_instance(point), keys=_DRILL_KEYS).drill
        except PolicyError as exc:
            # as the scheduler treats a malformed policy tag: said, not a failure of the tick
            plan.notes.append(f"{here}: not drilled: {exc}")
            continue
        if interval is None:
            continue
        last = engine.state.last_drill(here, instance_id)
        if last is not None and now - last.at < interval:
            continue
        payload = {
            "instance_name": point.instance_name,
            "interval_s": int(interval.total_seconds()),
        }
        plan.jobs.append(drill_job(here, instance_id, slot_of(now, interval), payload))
    return plan


def no_copy_notes(engine: Engine, report: TickReport, view: PointsView) -> list[str]:
    """For a whole-site tick: each instance its schedules list whose operations ask for
    drills but that no destination holds a copy of yet (nothing to drill there), a line each."""
    notes: list[str] = []
    for schedule in report.schedule:
        for instance in [d.instance for d in schedule.due] + [n.instance for n in schedule.not_due]:
            try:
                interval = engine.operations(instance, keys=_DRILL_KEYS).drill
                policy = resolve_policy(instance, engine.site.config)
            except PolicyError:
                continue  # the schedule reports it malformed
            if interval is None or policy is None:
                continue
            label = f"{instance.id} ({instance.name})"
            every = format_duration(interval)
            if not policy.copy_to:
                notes.append(f"{label}: drill every {every}, but its policy copies nowhere")
            for dest in policy.copy_to:
                try:
                    held = any(p.lineage for p in view.points(str(dest), instance.id))
                except RegionVaultError:
                    continue  # the copy flow reports it
                if not held:
                    notes.append(
                        f"{label}: drill every {every}: no copy in "
                        f"{engine.region(str(dest)).name} yet, nothing to drill"
                    )
    return notes


def run_drill(engine: Engine, job: Job) -> dict[str, Any]:
    """The ``drill`` job: terminate the region's leftovers, restore the instance's newest
    copy there, launch it (health check, ``regionvault_after_launch``, the drill record) and
    terminate it. Raises :class:`DrillFailed` when it cannot launch, is not healthy, or
    cannot be terminated; a transient error as it is (the executor retries it)."""
    here = engine.region(job.region or "").name
    try:
        instance_id = str(job.payload["instance_id"])
    except KeyError:
        raise RegionVaultError(f"job {job.key}: payload lacks 'instance_id'") from None
    swept, problems = sweep_drill_instances(engine, here)
    copies = [p for p in engine.points(here, instance_id) if p.lineage is not None]
    if not copies:
        raise DrillFailed(f"drill of {instance_id} in {here}: no copy of it there to restore")
    point = copies[-1]
    drill_id = secrets.token_hex(8)
    with _running_lock:
        _running.add(drill_id)
    try:
        try:
            outcome = _drill(engine, here, instance_id, point, drill_id, swept, problems)
        except Exception as exc:
            # the region's event log: the drill and its result (the restore's own event,
            # with its launch, precedes it)
            engine.record_event(here, EventAction.DRILL, point, exc, drill=drill_id)
            raise
        engine.record_event(
            here,
            EventAction.DRILL,
            point,
            drill=drill_id,
            launched=outcome["launched"],
            rto_ms=round(float(outcome["rto_seconds"]) * 1000),
            terminated=True,
        )
        return outcome
    finally:
        with _running_lock:
            _running.discard(drill_id)


def _drill(
    engine: Engine,
    here: str,
    instance_id: str,
    point: RecoveryPoint,
    drill_id: str,
    swept: list[str],
    problems: list[str],
) -> dict[str, Any]:
    try:
        result = engine.restore(
            point.id, region=here, launch=True, tags=drill_tags(engine, point, drill_id)
        )
    except BaseException as exc:
        # a launch that failed after its instance existed must not leave it running
        for line in _terminate_drill(engine, here, drill_id):
            exc.add_note(f"drill {drill_id} in {here}: {line}")
        if isinstance(exc, TransientError) or not isinstance(exc, Exception):
            raise
        raise DrillFailed(
            f"drill of {instance_id} in {here}: cannot launch copy {point.id}: {exc}"
        ) from exc
    assert result.instance is not None  # launch=True
    launched = result.instance
    terminate_error: str | None = None
    try:
        engine.region(here).compute.terminate(launched.id)
    except RegionVaultError as exc:
        terminate_error = str(exc)
    if not result.healthy:
        left = (
            f"; it could not be terminated ({terminate_error}): a later tick terminates it"
            if terminate_error
            else "; terminated"
        )
        raise DrillFailed(
            f"drill of {instance_id} in {here}: {launched.id} ({launched.name}) launched from "
            f"copy {point.id} did not become healthy ({result.health_error}){left}"
        )
    if terminate_error is not None:
        raise DrillFailed(
            f"drill of {instance_id} in {here}: healthy in {result.seconds_to_healthy:.2f}s, "
            f"but {launched.id} could not be terminated ({terminate_error}): a later tick "
            "terminates it"
        )
    return {
        "point": point.id,
        "launched": launched.id,
        "healthy": True,
        "rto_seconds": result.seconds_to_healthy,
        "terminated": True,
        "swept": swept,
        "problems": problems,
    }


def drill_jobs(
    engine: Engine,
    report: TickReport,
    regions: Iterable[str],
    now: datetime,
    view: PointsView | None = None,
) -> list[Job]:
    """A tick's drill jobs in ``regions`` (:func:`plan_drills`), their notes and problems
    added to ``report``; with ``view`` (a whole-site tick's), the instances with no copy to
    drill yet too (:func:`no_copy_notes`)."""
    if view is not None:
        report.notes.extend(no_copy_notes(engine, report, view))
    jobs: list[Job] = []
    for region in regions:
        jobs.extend(plan_drills(engine, region, now).add_to(report))
    return jobs
