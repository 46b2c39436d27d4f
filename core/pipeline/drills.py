"""Scheduled drills: restore an instance's newest copy in a destination region, launch it,
health-check it, record the RTO, and terminate it, once per slot of the drill interval.

An instance whose operations (core/operations.py) say ``drill = D`` is drilled in every
region that holds a copy of it: each tick plans, in each region, a ``drill`` job
(:func:`~regionvault.core.pipeline.jobs.drill_job`, key ``drill/<region>/<instance>/<slot>``,
slot ``slot_of(now, D)``) for every instance whose current slot has no finished drill in
the region's event log (docs/operations.md). The job runs in that region with its
credentials alone: it records the drill's start in the region's event log, calls
:meth:`Engine.restore` with ``launch=True`` (restore, launch, health check,
``regionvault_after_launch``), terminates the instance, healthy or not, and records the
drill's end there (and in this machine's state store, a cache). An unhealthy drill, or one
that cannot launch, is a failed job whose end is on record: the slot is drilled, the next
tick of the slot does not try again. Only a transient failure leaves the slot open.

The launched instance carries three tags (docs/operations.md): :data:`DRILL_TAG` (this
drill's own random id), :data:`DRILL_RUNNER_TAG` and :data:`DRILL_UNTIL_TAG`, for people
reading the console. It is opted out of backups (the policy tag ``none``) and its operations
tags are dropped. A drill killed between launch and terminate leaves its instance running:
every tick (when it plans drills) and every drill job first terminates each instance of the
region whose :data:`DRILL_TAG` names a drill whose start the region's event log holds, and
whose drill is over (:func:`sweep_drill_instances`): never an instance on its tags alone.
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
from regionvault.core.errors import (
    PolicyError,
    RegionVaultError,
    RepositoryNotFound,
    TransientError,
)
from regionvault.core.operations import OPERATION_KEYS
from regionvault.core.pipeline.jobs import Job, drill_job, format_slot, slot_of
from regionvault.core.pipeline.objectives import (
    CLOCK_SKEW,
    LiveInstances,
    drill_record,
    live_instance,
    newest_captured,
    point_instance,
)
from regionvault.core.pipeline.state import DrillRecord
from regionvault.core.policy import resolve_policy
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import Event, EventAction

if TYPE_CHECKING:
    from regionvault.core.pipeline.engine import Engine, PointsView
    from regionvault.core.pipeline.reports import TickReport
    from regionvault.core.types import Instance, RecoveryPoint

__all__ = [
    "DRILL_ALLOWANCE",
    "DRILL_RECORD_WINDOW",
    "DRILL_RUNNER_TAG",
    "DRILL_TAG",
    "DRILL_UNTIL_TAG",
    "DrillFailed",
    "DrillPlan",
    "drill_jobs",
    "drill_tags",
    "newest_copies",
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
#: how far back the sweep reads a region's event log for the drills on record: a drill
#: instance left behind longer than this (no tick swept the region meanwhile) is no longer
#: told from a forged one, and is left alone (said in the tick's notes)
DRILL_RECORD_WINDOW = timedelta(days=7)


class DrillFailed(RegionVaultError):
    """A drill that could not launch, or launched an instance that did not become healthy
    (terminated all the same), or could not terminate it. ``detail``: what its ``drill``
    event records besides (the launched instance, healthy, its RTO)."""

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.detail: dict[str, Any] = dict(detail or {})


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


def drill_tags(
    engine: Engine, point: RecoveryPoint, drill_id: str, until: int | None = None
) -> dict[str, str]:
    """The tags of a drill's launched instance: the point's instance's, opted out of
    backups and drills (the policy tag ``none``, no operations tags), with the drill's marks
    (``until``: whole seconds since the epoch; by default the health timeout and
    :data:`DRILL_ALLOWANCE` from now)."""
    tags = dict(point_instance(point).tags)
    for tag in OPERATION_KEYS.values():
        tags.pop(tag, None)
    tags[engine.site.config.tag_key] = "none"
    if until is None:
        until = _until(engine, point.region)
    tags[DRILL_TAG] = drill_id
    tags[DRILL_RUNNER_TAG] = ProcessIdentity.current().token()
    tags[DRILL_UNTIL_TAG] = str(until)
    return tags


def _until(engine: Engine, region: str) -> int:
    timeout = engine.health_timeout_of(region)
    return int(time.time() + timeout + DRILL_ALLOWANCE.total_seconds())


#: the drills running in this process (their :data:`DRILL_TAG` ids): one of this process's
#: drill instances whose id is not here is left behind (its terminate failed)
_running: set[str] = set()
_running_lock = threading.Lock()


def _drills_on_record(events: Iterable[Event]) -> tuple[dict[str, Event], dict[str, Event]]:
    """The ``drill`` events among ``events`` by drill id: ``(started, ended)``."""
    started: dict[str, Event] = {}
    ended: dict[str, Event] = {}
    for event in events:
        if event.action != EventAction.DRILL:
            continue
        drill_id = event.detail.get("drill")
        if not isinstance(drill_id, str) or not drill_id:
            continue
        if event.detail.get("phase") == "start":
            started[drill_id] = event
        else:
            ended[drill_id] = event
    return started, ended


def _left_behind(
    instance: Instance, started: dict[str, Event], ended: dict[str, Event], now: float
) -> tuple[str | None, str | None]:
    """``(why it is a drill left behind, why it is left alone)``: the first None while
    its drill may still run, or when it is no drill regionvault recorded launching."""
    drill_id = instance.tags.get(DRILL_TAG, "")
    start = started.get(drill_id)
    if start is None:
        # its tags alone never terminate an instance: anyone who may tag could forge them
        return None, f"it carries {DRILL_TAG} but no drill of that id is on record here"
    with _running_lock:
        if drill_id in _running:
            return None, None
    end = ended.get(drill_id)
    if end is not None:
        launched = end.detail.get("launched")
        if isinstance(launched, str) and launched and launched != instance.id:
            return None, f"its drill {drill_id} launched {launched}, not this instance"
        return "its drill is over", None
    token = str(start.detail.get("runner") or "")
    if token == ProcessIdentity.current().token():
        return "its drill in this process is over", None
    runner = ProcessIdentity.from_token(token)
    if runner is not None and runner.alive() is False:
        return "its drill's process is gone", None
    until = start.detail.get("until")
    if isinstance(until, int) and until < now:
        return "its drill's time is over", None
    return None, None


def sweep_drill_instances(engine: Engine, region: str) -> tuple[list[str], list[str]]:
    """Terminate the drill instances of ``region`` left behind (by a drill killed between
    launch and terminate, or whose terminate failed): ``(notes, problems)``, a line each.

    Only a drill regionvault recorded launching is terminated: the instance's
    :data:`DRILL_TAG` must name a drill whose start the region's event log holds (written
    before the launch; read back :data:`DRILL_RECORD_WINDOW`), and its drill must be over:
    its end is on record (and names this instance, when it names one), its recorded runner
    is this process or is gone, or its recorded ``until`` has passed. The instance's own
    tags decide nothing else. The log is read only when the region has drill-tagged
    instances."""
    r = engine.region(region)
    notes: list[str] = []
    problems: list[str] = []
    found = list(r.compute.list_instances(tag_filters={DRILL_TAG: None}))
    if not found:
        return notes, problems
    try:
        repo = engine.repository(r.name, create=False)
    except RepositoryNotFound:
        events: list[Event] = []  # nothing recorded here: no drill of ours ran here
    else:
        events = repo.events(engine.clock() - DRILL_RECORD_WINDOW)
    started, ended = _drills_on_record(events)
    now = time.time()
    for instance in found:
        why, alone = _left_behind(instance, started, ended, now)
        if why is None:
            if alone is not None:
                notes.append(f"{r.name}: {instance.id} ({instance.name}) left alone: {alone}")
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


def copies_by_instance(engine: Engine, region: str) -> dict[str, list[RecoveryPoint]]:
    """Per instance, its copies in ``region``, oldest first by arrival (no manifest read)."""
    by_instance: dict[str, list[RecoveryPoint]] = {}
    for point in engine.points(region):
        if point.lineage is not None:
            by_instance.setdefault(point.instance_id, []).append(point)
    return by_instance


def newest_copies(engine: Engine, region: str) -> dict[str, RecoveryPoint]:
    """Per instance, its copy in ``region`` holding the newest data (by capture time:
    :func:`~regionvault.core.pipeline.objectives.newest_captured`)."""
    by_instance = copies_by_instance(engine, region)
    if not by_instance:
        return {}
    repo = engine.repository(region, create=False)
    newest: dict[str, RecoveryPoint] = {}
    for instance_id, copies in by_instance.items():
        found = newest_captured(repo, copies)
        if found is not None:
            newest[instance_id] = found[0]
    return newest


def _drilled_in_slot(record: DrillRecord, slot: datetime, interval: timedelta) -> bool:
    if record.slot is not None:
        return record.slot == format_slot(slot)
    return slot_of(record.at, interval) == slot


def plan_drills(engine: Engine, region: str, now: datetime) -> DrillPlan:
    """``region``'s drills due at ``now``, after terminating the drill instances left
    behind (:func:`sweep_drill_instances`): a job for each instance with a copy there whose
    drill interval ``D`` (its live tags where its home region answers, else its newest
    copy's) asks for one and whose slot ``slot_of(now, D)`` has no finished drill on record
    in the region's event log (healthy or not, launched or not: a slot is drilled once; a
    transient failure is retried). An instance opted out at home is not drilled.

    What it reads: the region's points, the newest copy's manifest of each instance, and
    the event log since the earliest current slot among the instances due, unless this
    machine's state store already holds each one's drill of its slot (a cache: never the
    reason to drill)."""
    here = engine.region(region).name
    plan = DrillPlan(here)
    try:
        plan.notes, plan.problems = sweep_drill_instances(engine, here)
    except RegionVaultError as exc:
        plan.problems.append(f"{here}: drills: cannot sweep drill instances: {exc}")
    try:
        arrived = copies_by_instance(engine, here)
    except RegionVaultError as exc:
        plan.problems.append(f"{here}: drills: {exc}")
        return plan
    live: LiveInstances = {}
    wanted: list[tuple[str, RecoveryPoint, timedelta, datetime]] = []
    for instance_id, copies in sorted(arrived.items()):
        # the interval from the newest arrival's tags (or the live ones): no manifest is
        # read for an instance that asks no drill
        instance = live_instance(engine, copies[-1], live)
        if instance is None:
            log.info("%s: %s not drilled: opted out in its home region", here, instance_id)
            continue
        try:
            interval = engine.operations(instance, keys=_DRILL_KEYS).drill
        except PolicyError as exc:
            # as the scheduler treats a malformed policy tag: said, not a failure of the tick
            plan.notes.append(f"{here}: not drilled: {exc}")
            continue
        if interval is None:
            continue
        try:
            found = newest_captured(engine.repository(here, create=False), copies)
        except RegionVaultError as exc:
            plan.problems.append(f"{here}: drills: {exc}")
            continue
        if found is None:
            continue
        point = found[0]
        slot = slot_of(now, interval)
        cached = engine.state.last_drill(here, instance_id)
        if (
            cached is not None
            and cached.at <= now + CLOCK_SKEW
            and cached.slot == format_slot(slot)
        ):
            continue
        wanted.append((instance_id, point, interval, slot))
    if not wanted:
        return plan
    try:
        events = engine.repository(here, create=False).events(min(w[3] for w in wanted))
    except RegionVaultError as exc:
        plan.problems.append(f"{here}: drills: cannot read the event log: {exc}")
        return plan
    done: set[str] = set()
    slots = {instance_id: (interval, slot) for instance_id, _point, interval, slot in wanted}
    for event in events:
        record = drill_record(event)
        if record is None:
            continue
        if record.at > now + CLOCK_SKEW:
            log.warning(
                "%s: drill record of %s dated %s, in the future: ignored",
                here,
                record.instance_id,
                record.at.isoformat(),
            )
            continue
        asked = slots.get(record.instance_id)  # one look-up per event, not one per instance
        if asked is not None and _drilled_in_slot(record, asked[1], asked[0]):
            done.add(record.instance_id)
    for instance_id, point, interval, slot in wanted:
        if instance_id in done:
            continue
        payload = {
            "instance_name": point.instance_name,
            "interval_s": int(interval.total_seconds()),
        }
        plan.jobs.append(drill_job(here, instance_id, slot, payload))
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
    """The ``drill`` job: terminate the region's leftovers, record the drill's start in the
    region's event log (no record, no launch), restore the instance's newest copy there,
    launch it (health check, ``regionvault_after_launch``) and terminate it, then record
    its end there (healthy or not, launched or not: the slot is drilled) and in this
    machine's state store (a cache). Raises :class:`DrillFailed` when it cannot launch, is
    not healthy, or cannot be terminated; a transient error as it is (the executor retries
    it, and its end is marked transient: the slot is not drilled yet)."""
    here = engine.region(job.region or "").name
    try:
        instance_id = str(job.payload["instance_id"])
    except KeyError:
        raise RegionVaultError(f"job {job.key}: payload lacks 'instance_id'") from None
    slot = str(job.payload.get("slot") or "")
    try:
        swept, problems = sweep_drill_instances(engine, here)
    except RegionVaultError as exc:
        swept, problems = [], [f"{here}: drills: cannot sweep drill instances: {exc}"]
    copies = [p for p in engine.points(here, instance_id) if p.lineage is not None]
    found = newest_captured(engine.repository(here, create=False), copies) if copies else None
    if found is None:
        raise DrillFailed(f"drill of {instance_id} in {here}: no copy of it there to restore")
    point = found[0]
    drill_id = secrets.token_hex(8)
    until = _until(engine, here)
    with _running_lock:
        _running.add(drill_id)
    try:
        marks: dict[str, Any] = {"drill": drill_id, "slot": slot or None}
        started = engine.record_event(
            here,
            EventAction.DRILL,
            point,
            phase="start",
            until=until,
            runner=ProcessIdentity.current().token(),
            **marks,
        )
        if started is None:
            # unrecorded, its instance could never be told from a forged one: not launched
            raise TransientError(
                f"drill of {instance_id} in {here}: its start cannot be recorded in the "
                "region's event log: not launched"
            )
        try:
            outcome = _drill(engine, here, instance_id, point, drill_id, until, swept, problems)
        except Exception as exc:
            # the region's event log: the drill and its result (the restore's own event,
            # with its launch, precedes it)
            detail = dict(getattr(exc, "detail", None) or {})
            transient = isinstance(exc, TransientError)
            engine.record_event(
                here, EventAction.DRILL, point, exc, transient=transient, **marks, **detail
            )
            if not transient:
                _cache(engine, here, point, slot, drill_id, detail)
            raise
        detail = {
            "launched": outcome["launched"],
            "healthy": True,
            "rto_ms": round(float(outcome["rto_seconds"]) * 1000),
            "terminated": True,
        }
        engine.record_event(here, EventAction.DRILL, point, **marks, **detail)
        _cache(engine, here, point, slot, drill_id, detail)
        return outcome
    finally:
        with _running_lock:
            _running.discard(drill_id)


def _cache(
    engine: Engine,
    here: str,
    point: RecoveryPoint,
    slot: str,
    drill_id: str,
    detail: dict[str, Any],
) -> None:
    """This machine's copy of a finished drill (the event log holds the record)."""
    rto_ms = detail.get("rto_ms")
    healthy = detail.get("healthy") is True
    try:
        engine.state.record_drill(
            DrillRecord(
                region=here,
                instance_id=point.instance_id,
                point_id=point.id,
                launched_id=str(detail.get("launched") or ""),
                at=engine.clock(),
                healthy=healthy,
                rto_seconds=rto_ms / 1000 if healthy and isinstance(rto_ms, int) else None,
                drill_id=drill_id,
                slot=slot or None,
            )
        )
    except OSError as exc:
        log.warning("%s: drill %s not cached in the state store: %s", here, drill_id, exc)


def _drill(
    engine: Engine,
    here: str,
    instance_id: str,
    point: RecoveryPoint,
    drill_id: str,
    until: int,
    swept: list[str],
    problems: list[str],
) -> dict[str, Any]:
    try:
        result = engine.restore(
            point.id, region=here, launch=True, tags=drill_tags(engine, point, drill_id, until)
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
    rto = result.seconds_to_healthy
    detail: dict[str, Any] = {
        "launched": launched.id,
        "healthy": result.healthy,
        "rto_ms": None if rto is None else round(rto * 1000),
        "terminated": terminate_error is None,
    }
    if not result.healthy:
        left = (
            f"; it could not be terminated ({terminate_error}): a later tick terminates it"
            if terminate_error
            else "; terminated"
        )
        raise DrillFailed(
            f"drill of {instance_id} in {here}: {launched.id} ({launched.name}) launched from "
            f"copy {point.id} did not become healthy ({result.health_error}){left}",
            detail=detail,
        )
    if terminate_error is not None:
        raise DrillFailed(
            f"drill of {instance_id} in {here}: healthy in {result.seconds_to_healthy:.2f}s, "
            f"but {launched.id} could not be terminated ({terminate_error}): a later tick "
            "terminates it",
            detail=detail,
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
