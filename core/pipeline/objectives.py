"""RPO and RTO objectives: whether each is ``met``, ``at_risk`` or ``breached`` for an
instance in a region, as ``status`` shows it (docs/operations.md has the rules).

The objectives and the drill interval are the instance's operations (core/operations.py),
read from the tags its newest recovery point in the region recorded (the instance's tags at
backup time): a destination region judges its copies with its own credentials alone, without
listing the home region's instances.
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
from regionvault.core.policy import Policy, resolve_policy
from regionvault.core.types import Instance

if TYPE_CHECKING:
    from regionvault.core.pipeline.ledger import Ledger
    from regionvault.core.pipeline.reports import StatusRow
    from regionvault.core.pipeline.state import DrillRecord, StateStore
    from regionvault.core.site import Site
    from regionvault.core.types import RecoveryPoint

__all__ = [
    "DRILL_STALE_WITHOUT_INTERVAL",
    "ObjectiveState",
    "StatusObjectives",
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

    def operations(
        self, instance: Instance, *, keys: Collection[str] | None = None
    ) -> Operations: ...


log = logging.getLogger(__name__)

#: the operations settings the objectives read
_OBJECTIVE_KEYS = frozenset({"rpo", "rto", "drill"})

#: with no drill interval, a drill older than this puts the RTO objective at risk
DRILL_STALE_WITHOUT_INTERVAL = timedelta(days=30)


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
    was unhealthy or took longer than the objective; ``at_risk`` when there is no drill yet
    or the last one is older than the drill ``interval`` (with none,
    :data:`DRILL_STALE_WITHOUT_INTERVAL`); ``met`` otherwise."""
    if objective is None:
        return None
    if drill is None:
        return ObjectiveState.AT_RISK
    if not drill.healthy or drill.rto_seconds is None:
        return ObjectiveState.BREACHED
    if drill.rto_seconds > objective.total_seconds():
        return ObjectiveState.BREACHED
    if now - drill.at > (interval if interval is not None else DRILL_STALE_WITHOUT_INTERVAL):
        return ObjectiveState.AT_RISK
    return ObjectiveState.MET


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

    def __init__(self, engine: Engine, now: datetime) -> None:
        self.engine = engine
        self.now = now
        self._ledger: Any = None
        self._ledger_failed = False

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

    def apply(self, row: StatusRow, newest: RecoveryPoint, captured: datetime) -> StatusRow:
        """``row`` with its objectives, their states and the drill interval, from the
        operations ``newest`` (its newest point in the region) recorded; ``captured`` is
        when that point's data was captured. An instance whose recorded tags no longer
        parse shows no objectives (logged)."""
        instance = point_instance(newest)
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
        drill = self.engine.state.last_drill(row.region, row.instance_id)
        rpo = rpo_state(ops.rpo, age=age, age_at_next_backup=at_next, last_backup_failed=failed)
        rto = rto_state(ops.rto, drill, interval=ops.drill, now=self.now)
        return replace(
            row,
            rpo_objective_seconds=None if ops.rpo is None else ops.rpo.total_seconds(),
            rpo_state=None if rpo is None else str(rpo),
            rto_objective_seconds=None if ops.rto is None else ops.rto.total_seconds(),
            rto_state=None if rto is None else str(rto),
            drill_interval_seconds=None if ops.drill is None else ops.drill.total_seconds(),
            last_backup_failed=failed,
        )
