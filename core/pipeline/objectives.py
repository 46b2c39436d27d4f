"""RPO and RTO objectives: whether each is ``met``, ``at_risk`` or ``breached`` for an
instance in a region, as ``status`` shows it (docs/operations.md has the rules).

The objectives and the drill interval are the instance's operations (core/operations.py),
read from the tags its newest recovery point in the region recorded (the instance's tags at
backup time): a destination region judges its copies with its own credentials alone. Where
the home region's compute answers, the instance's live tags win (:func:`live_instance`): an
instance opted out since (policy ``none``) or gone is neither judged nor drilled.

"Newest" is by capture time (:func:`newest_captured`), not by arrival: a copy of an old
point that arrives late is not the newest data. The last drill of an instance in a region
is read from the region's event log (its ``drill`` events, :func:`drill_records`), which
every machine of the site reads; the local state store is only a fallback for display.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from regionvault.core.errors import PolicyError, RegionVaultError
from regionvault.core.operations import Operations
from regionvault.core.pipeline.jobs import RUN_TAG, SLOT_TAG, backup_job, parse_slot, slot_of
from regionvault.core.pipeline.state import DrillRecord
from regionvault.core.policy import Policy, resolve_policy
from regionvault.core.repository import Event, EventAction, EventResult, Repository
from regionvault.core.types import Instance

if TYPE_CHECKING:
    from regionvault.core.pipeline.ledger import Ledger
    from regionvault.core.pipeline.reports import StatusRow
    from regionvault.core.pipeline.state import StateStore
    from regionvault.core.site import Region, Site
    from regionvault.core.types import RecoveryPoint

__all__ = [
    "CLOCK_SKEW",
    "DRILL_STALE_WITHOUT_INTERVAL",
    "ObjectiveState",
    "StatusObjectives",
    "drill_record",
    "drill_records",
    "drill_window",
    "last_drill",
    "live_instance",
    "newest_captured",
    "point_instance",
    "rpo_state",
    "rto_state",
]


class Engine(Protocol):
    """What the objectives read of the engine (core/pipeline/engine.py imports this module,
    so it names a protocol, not the class)."""

    site: Site
    state: StateStore

    def ledger(self) -> Ledger: ...

    def region(self, name: str) -> Region: ...

    def repository(self, region: str, *, create: bool = ...) -> Repository: ...

    def operations(
        self, instance: Instance, *, keys: Collection[str] | None = None
    ) -> Operations: ...


log = logging.getLogger(__name__)

#: the operations settings the objectives read
_OBJECTIVE_KEYS = frozenset({"rpo", "rto", "drill"})

#: with no drill interval, a drill older than this puts the RTO objective at risk
DRILL_STALE_WITHOUT_INTERVAL = timedelta(days=30)
#: a drill record dated later than now by more than this (a clock ahead) is ignored; less
#: is the skew of clocks kept in step, and the microseconds the event log adds to keep its
#: order when a clock stands still
CLOCK_SKEW = timedelta(minutes=1)


class ObjectiveState(enum.StrEnum):
    MET = "met"
    AT_RISK = "at_risk"
    BREACHED = "breached"


def rpo_state(
    objective: timedelta | None,
    *,
    age: timedelta,
    age_at_next_backup: timedelta | None,
    last_backup_failed: bool,
) -> ObjectiveState | None:
    """The RPO objective's state (None with no objective): ``breached`` when the data's
    ``age`` exceeds it; ``at_risk`` when the data will be older than it when the next
    backup is due (``age_at_next_backup``; None: unknown, not judged) or the instance's last
    backup job failed; ``met`` otherwise."""
    if objective is None:
        return None
    if age > objective:
        return ObjectiveState.BREACHED
    if last_backup_failed or (age_at_next_backup is not None and age_at_next_backup > objective):
        return ObjectiveState.AT_RISK
    return ObjectiveState.MET


def rto_state(
    objective: timedelta | None,
    drill: DrillRecord | None,
    *,
    interval: timedelta | None,
    now: datetime,
) -> ObjectiveState | None:
    """The RTO objective's state (None with no objective): ``breached`` when the last drill
    was unhealthy or took longer than the objective; ``at_risk`` when there is no drill yet,
    the last one is dated in the future, or it is stale: with a drill ``interval``, the
    rule the scheduler drills by (:func:`drill_window`: a drill in this slot of the interval
    or the one before), without one, older than :data:`DRILL_STALE_WITHOUT_INTERVAL`
    (a record more than :data:`CLOCK_SKEW` ahead of ``now`` is no drill);
    ``met`` otherwise."""
    if objective is None:
        return None
    if drill is None or drill.at > now + CLOCK_SKEW:
        return ObjectiveState.AT_RISK
    if not drill.healthy or drill.rto_seconds is None:
        return ObjectiveState.BREACHED
    if drill.rto_seconds > objective.total_seconds():
        return ObjectiveState.BREACHED
    if drill.at < drill_window(interval, now):
        return ObjectiveState.AT_RISK
    return ObjectiveState.MET


def drill_window(interval: timedelta | None, now: datetime) -> datetime:
    """Since when a drill keeps the RTO objective from going stale at ``now``: the start of
    the slot before this one of the drill ``interval`` (a drill is due once per slot,
    ``slot_of(now, interval)``, so the last one may lie anywhere in the slot before), or
    :data:`DRILL_STALE_WITHOUT_INTERVAL` ago without an interval."""
    if interval is None:
        return now - DRILL_STALE_WITHOUT_INTERVAL
    return slot_of(now, interval) - interval


def drill_records(events: list[Event], now: datetime) -> dict[str, DrillRecord]:
    """The newest finished drill of each instance (by id) among a region's ``events``: a
    ``drill`` event that is not a drill's start and not a transient failure (the job is
    retried). A record dated after ``now`` (a clock ahead) is left out, with a warning."""
    found: dict[str, DrillRecord] = {}
    for event in events:
        record = _drill_record(event)
        if record is None:
            continue
        if record.at > now + CLOCK_SKEW:
            log.warning(
                "%s: drill record of %s dated %s, in the future (now %s): ignored",
                record.region,
                record.instance_id,
                record.at.isoformat(),
                now.isoformat(),
            )
            continue
        if record.instance_id not in found or found[record.instance_id].at <= record.at:
            found[record.instance_id] = record
    return found


def drill_record(event: Event) -> DrillRecord | None:
    """The finished drill a ``drill`` event records, or None (another action, a drill's
    start, a transient failure; its ``region`` is the one the event's detail names, if
    any: the caller knows the region it read)."""
    return _drill_record(event)


def _drill_record(event: Event) -> DrillRecord | None:
    if event.action != EventAction.DRILL or event.instance is None:
        return None
    detail = event.detail
    if detail.get("phase") == "start" or detail.get("transient") is True:
        return None
    healthy = event.result == EventResult.OK or detail.get("healthy") is True
    rto_ms = detail.get("rto_ms")
    launched = detail.get("launched")
    return DrillRecord(
        region=str(detail.get("region") or ""),
        instance_id=event.instance,
        point_id=event.point or "",
        launched_id=launched if isinstance(launched, str) else "",
        at=event.at,
        healthy=healthy,
        rto_seconds=rto_ms / 1000 if healthy and isinstance(rto_ms, int) else None,
        drill_id=str(detail.get("drill") or "") or None,
        slot=str(detail.get("slot") or "") or None,
    )


def last_drill(
    engine: Engine, region: str, instance_id: str, *, since: datetime, now: datetime
) -> DrillRecord | None:
    """The last drill of ``instance_id`` in ``region`` recorded in the region's event log
    at or after ``since`` (only those events are read and decrypted; the log's names are
    listed), else None. Raises what reading the log raises."""
    events = engine.repository(region, create=False).events(since)
    record = drill_records(events, now).get(instance_id)
    return None if record is None else replace(record, region=engine.region(region).name)


def newest_captured(
    repo: Repository, points: list[RecoveryPoint]
) -> tuple[RecoveryPoint, datetime] | None:
    """The point of ``points`` (oldest first, by arrival) holding the newest data, by its
    manifest's capture time (``taken_at``; a copy's is its source's), and that time. A
    point's capture precedes its arrival, so the scan from the newest arrival stops at the
    first point that arrived before the best capture found: usually one manifest read. A
    manifest that cannot be read counts as captured on arrival."""
    best: tuple[RecoveryPoint, datetime] | None = None
    for point in reversed(points):
        if best is not None and point.created_at < best[1]:
            break
        try:
            taken = repo.load_manifest(point.id).taken_at
        except RegionVaultError:
            taken = point.created_at
        if best is None or taken > best[1]:
            best = (point, taken)
    return best


#: per home region: its live instances by id, or None when they cannot be listed
LiveInstances = dict[str, "dict[str, Instance] | None"]


def live_instance(
    engine: Engine, point: RecoveryPoint, cache: LiveInstances | None = None
) -> Instance | None:
    """The instance ``point`` was taken of, with its live tags when its home region's
    compute answers: None when it is opted out there (its policy resolves to none). When
    it is gone (not among the home's live instances), its live tags do not parse, or its
    home region cannot be read (a destination worker without the home's credentials, an
    outage), the tags ``point`` recorded (:func:`point_instance`): its copies are what is
    left of it. ``cache``: the home regions' listings, for one caller's many points (one
    listing of each home region per call, not a call per instance)."""
    recorded = point_instance(point)
    if cache is None:
        cache = {}
    if recorded.region not in cache:
        try:
            compute = engine.region(recorded.region).compute
            cache[recorded.region] = {i.id: i for i in compute.list_instances()}
        except Exception as exc:  # any provider's error: the recorded tags decide
            log.info("%s: live tags not read (%s: %s)", recorded.region, type(exc).__name__, exc)
            cache[recorded.region] = None
    listed = cache[recorded.region]
    found = None if listed is None else listed.get(recorded.id)
    if found is None:
        return recorded
    live = replace(recorded, tags=found.tags)
    try:
        if resolve_policy(live, engine.site.config) is None:
            return None
    except PolicyError:
        return recorded
    return live


def point_instance(point: RecoveryPoint) -> Instance:
    """The instance ``point`` was taken of, as its tags recorded it (in its home region)."""
    home = point.lineage.source_region if point.lineage is not None else point.region
    return Instance(
        id=point.instance_id,
        name=point.instance_name,
        region=home,
        tags=point.tags.without([SLOT_TAG, RUN_TAG]),
        function=point.function,
    )


class StatusObjectives:
    """Judges ``status`` rows against their objectives at ``now``, for one ``status`` call
    (the job ledger, for the last backup job's outcome, is opened once, when first asked)."""

    def __init__(self, engine: Engine, now: datetime, *, live: LiveInstances | None = None) -> None:
        self.engine = engine
        self.now = now
        self._ledger: Any = None
        self._ledger_failed = False
        #: per region: since when its drill events were read, and the drills found
        self._drills: dict[str, tuple[datetime, dict[str, DrillRecord]]] = {}
        #: the instances' live tags (:func:`live_instance`), by id
        self._live: LiveInstances = {} if live is None else live

    def close(self) -> None:
        close = getattr(self._ledger, "close", None)
        if close is not None:
            close()

    def _last_backup_failed(self, instance: Instance, frequency: timedelta) -> bool:
        """Whether the newest backup job of ``instance`` on record in the site's job ledger
        (this slot's, else the one before) failed: a ledger that cannot be read counts as
        no failure (logged)."""
        if self._ledger_failed:
            return False
        try:
            if self._ledger is None:
                self._ledger = self.engine.ledger()
            ledger = self._ledger
            last_failure = getattr(ledger, "last_failure", None)
            slot = slot_of(self.now, frequency)
            for s in (slot, slot - frequency):
                key = backup_job(instance.region, instance.id, s).key
                if ledger.record(key) is not None:
                    return False
                if last_failure is not None and last_failure(key) is not None:
                    return True
        except Exception as exc:
            # any executor kind's ledger (Redis: its own errors): status still answers
            log.warning(
                "status: the job ledger cannot be read (%s: %s): backup failures not shown",
                type(exc).__name__,
                exc,
            )
            self._ledger_failed = True
        return False

    def _last_drill(
        self, region: str, instance_id: str, interval: timedelta | None
    ) -> DrillRecord | None:
        """The last drill of ``instance_id`` in ``region``: from the region's event log
        since :func:`drill_window` (the oldest a drill that keeps the objective met may be;
        per region, read once at the earliest window asked), else this machine's state
        store (a cache: a drill older than the window, or one whose event was not
        written). A record dated in the future is ignored with a warning."""
        floor = drill_window(interval, self.now)
        cached = self._drills.get(region)
        if cached is None or floor < cached[0]:
            try:
                events = self.engine.repository(region, create=False).events(floor)
            except RegionVaultError as exc:
                log.warning("status: %s: drill events not read: %s", region, exc)
                events = []
            cached = (floor, drill_records(events, self.now))
            self._drills[region] = cached
        record = cached[1].get(instance_id)
        if record is not None and record.at >= floor:
            return replace(record, region=region)
        local = self.engine.state.last_drill(region, instance_id)
        if local is not None and local.at > self.now + CLOCK_SKEW:
            log.warning(
                "status: %s: drill record of %s dated %s, in the future: ignored",
                region,
                instance_id,
                local.at.isoformat(),
            )
            local = None
        if record is not None and (local is None or local.at < record.at):
            return replace(record, region=region)
        return local

    def apply(self, row: StatusRow, newest: RecoveryPoint, captured: datetime) -> StatusRow:
        """``row`` with its last drill, its objectives, their states and the drill
        interval, from the operations of the instance ``newest`` (its point holding the
        newest data in the region) was taken of: its live tags where its home region
        answers (:func:`live_instance`), else those ``newest`` recorded; ``captured`` is
        when that point's data was captured. An instance opted out at home shows no
        objectives; one whose recorded tags no longer parse neither (logged). A home row
        shows an RTO state only once a drill ran there."""
        instance = live_instance(self.engine, newest, self._live)
        if instance is None:
            return row  # opted out: not judged
        try:
            ops = self.engine.operations(instance, keys=_OBJECTIVE_KEYS)
        except PolicyError as exc:
            log.warning("status: %s: %s", row.region, exc)
            ops = Operations()
        try:
            policy: Policy | None = resolve_policy(instance, self.engine.site.config)
        except PolicyError:
            policy = None
        age = self.now - captured
        at_next: timedelta | None = None
        failed = False
        if ops.rpo is not None and policy is not None:
            slot_text = newest.tags.get(SLOT_TAG)
            try:
                last = parse_slot(slot_text) if slot_text else captured
            except RegionVaultError:
                last = captured
            # the scheduler backs the instance up again once its newest slot is a frequency
            # old: by then its data is this old (now, when that is later)
            at_next = max(age, last + policy.frequency - captured)
            failed = self._last_backup_failed(instance, policy.frequency)
        drill = self._last_drill(row.region, row.instance_id, ops.drill)
        rpo = rpo_state(ops.rpo, age=age, age_at_next_backup=at_next, last_backup_failed=failed)
        rto = rto_state(ops.rto, drill, interval=ops.drill, now=self.now)
        if row.role == "home" and drill is None:
            rto = None  # drills run in destinations: none ran here
        return replace(
            row,
            last_drill_at=drill.at if drill else None,
            last_drill_rto=drill.rto_seconds if drill else None,
            last_drill_healthy=drill.healthy if drill else None,
            rpo_objective_seconds=None if ops.rpo is None else ops.rpo.total_seconds(),
            rpo_state=None if rpo is None else str(rpo),
            rto_objective_seconds=None if ops.rto is None else ops.rto.total_seconds(),
            rto_state=None if rto is None else str(rto),
            drill_interval_seconds=None if ops.drill is None else ops.drill.total_seconds(),
            last_backup_failed=failed,
        )
