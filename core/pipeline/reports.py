"""What the pipeline's steps report: a tick (:class:`TickReport`), a restore
(:class:`RestoreResult`), retention (:class:`RetentionReport`) and where an instance stands in a
region (:class:`StatusRow`). Plain values: the engine, the service and the CLI share them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from regionvault.core.pipeline.jobs import JobOutcome, JobStatus
from regionvault.core.pipeline.scheduler import ScheduleReport
from regionvault.core.pipeline.tagger import TagReport
from regionvault.core.types import Instance, RecoveryPoint

__all__ = ["RestoreResult", "RetentionReport", "StatusRow", "TickReport"]


@dataclass(frozen=True)
class RestoreResult:
    point: RecoveryPoint
    region: str
    #: where the data was restored (a directory or image file), None for a cloud sink
    target: Path | None
    instance: Instance | None = None
    #: the RTO: from the restore request to a healthy instance; None if it never was healthy
    seconds_to_healthy: float | None = None
    seconds_to_restore: float = 0.0
    #: why a launched instance is not healthy (timed out, terminated, health check raised);
    #: the instance is left as it is, never removed by the engine
    health_error: str | None = None
    #: what the restore could not apply (owners and device nodes when not root, sockets,
    #: extended attributes the target refuses), one line per kind; the data is whole
    notes: tuple[str, ...] = ()
    #: what of the source instance the launch could not carry over (a key pair or security
    #: group the region lacks, billing details the image lost), one line each
    not_carried: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.seconds_to_healthy is not None


@dataclass
class RetentionReport:
    region: str
    forgotten: list[str] = field(default_factory=list)
    #: expired points that a WORM lock or legal hold keeps
    protected: list[str] = field(default_factory=list)
    prune: dict[str, Any] = field(default_factory=dict)


@dataclass
class TickReport:
    at: datetime
    tagged: list[TagReport] = field(default_factory=list)
    schedule: list[ScheduleReport] = field(default_factory=list)
    jobs: list[JobOutcome] = field(default_factory=list)
    #: problems met outside any job (a region that could not be listed, ...)
    problems: list[str] = field(default_factory=list)
    #: the region of a region's own tick (``tick(region=...)``); None for a whole-site tick
    region: str | None = None
    #: what the tick says that is no failure: an instance with a drill interval and no copy
    #: to drill yet, a drill instance left behind that it terminated (core/pipeline/drills.py)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures()

    def failures(self) -> list[JobOutcome]:
        # a BUSY job is not a failure: another runner is doing it right now; nor is a STOPPED
        # one: the runner was stopped while it waited to retry, and a later run retries it
        return [o for o in self.jobs if o.status is JobStatus.FAILED]

    def incomplete(self) -> list[JobOutcome]:
        """The jobs this tick ran that did their work but not whole (a backup whose point
        names entries it could not take); one replayed from an earlier tick is not counted
        again."""
        return [o for o in self.jobs if o.status is JobStatus.DONE and o.incomplete]

    @property
    def outcome(self) -> str:
        """``failed`` (a job failed, or a problem outside any job), else ``incomplete`` (a
        job ran but did not do its work whole), else ``ok``."""
        if not self.ok:
            return "failed"
        return "incomplete" if self.incomplete() else "ok"

    def to_dict(self) -> dict[str, Any]:
        """The tick as plain JSON data: what ``regionvault tick --json`` prints. The
        schedules are their summaries here; :meth:`schedule_dicts` has them whole."""
        region = {"region": self.region} if self.region is not None else {}
        return {
            **region,
            "at": self.at.isoformat(),
            "ok": self.ok,
            "outcome": self.outcome,
            "tagged": [t.instance_id for rep in self.tagged for t in rep.tagged],
            "schedule": [s.summary() for s in self.schedule],
            "jobs": [o.to_dict() for o in self.jobs],
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def schedule_dicts(self) -> list[dict[str, Any]]:
        """Each schedule whole, as :meth:`ScheduleReport.to_dict` gives it."""
        return [s.to_dict() for s in self.schedule]

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], schedules: list[Mapping[str, Any]] | None = None
    ) -> TickReport:
        """A report from :meth:`to_dict` (and, for whole schedules, :meth:`schedule_dicts`;
        without them the schedules are left out: :meth:`to_dict` has their summaries
        only). ``tagged`` is not carried: the service's ticks report tagging as jobs."""
        return cls(
            at=datetime.fromisoformat(data["at"]),
            schedule=[ScheduleReport.from_dict(s) for s in schedules or ()],
            jobs=[JobOutcome.from_dict(o) for o in data.get("jobs", ())],
            problems=[str(p) for p in data.get("problems", ())],
            region=data.get("region"),
            notes=[str(n) for n in data.get("notes", ())],
        )


@dataclass(frozen=True)
class StatusRow:
    """Where one instance stands in one region."""

    instance_id: str
    instance_name: str
    region: str
    #: home region (backups) or a copy destination
    role: str
    newest_point: str | None
    newest_at: datetime | None
    #: the RPO right now: age of the data in the newest recovery point (since its capture;
    #: for a copy, since the source was captured, not since the copy was made)
    rpo_seconds: float | None
    points: int
    last_copy_at: datetime | None = None
    #: entries the newest point names as not taken whole (0: it is complete)
    newest_issues: int = 0
    last_drill_at: datetime | None = None
    last_drill_rto: float | None = None
    last_drill_healthy: bool | None = None
    #: the RPO and RTO objectives (None: none) and their states, ``met``, ``at_risk`` or
    #: ``breached`` (None with no objective): core/pipeline/objectives.py, docs/operations.md
    rpo_objective_seconds: float | None = None
    rpo_state: str | None = None
    rto_objective_seconds: float | None = None
    rto_state: str | None = None
    #: the drill interval (None: no scheduled drills)
    drill_interval_seconds: float | None = None
    #: the instance's newest backup job on record failed (judged only with an RPO objective)
    last_backup_failed: bool = False
    #: the protection state (core/pipeline/protection.py: ``failing``, ``malformed``,
    #: ``late``, ``due``, ``not_backed_up``, ``gone``, ``opted_out``, ``protected``) and why
    state: str | None = None
    state_reason: str | None = None

    @property
    def breached(self) -> bool:
        """An objective is breached."""
        return "breached" in (self.rpo_state, self.rto_state)

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "instance_id": self.instance_id,
            "instance_name": self.instance_name,
            "region": self.region,
            "role": self.role,
            "newest_point": self.newest_point,
            "newest_at": iso(self.newest_at),
            "rpo_seconds": self.rpo_seconds,
            "points": self.points,
            "newest_issues": self.newest_issues,
            "last_copy_at": iso(self.last_copy_at),
            "last_drill_at": iso(self.last_drill_at),
            "last_drill_rto": self.last_drill_rto,
            "last_drill_healthy": self.last_drill_healthy,
            "drill_interval_seconds": self.drill_interval_seconds,
            "rpo_objective_seconds": self.rpo_objective_seconds,
            "rpo_state": self.rpo_state,
            "rto_objective_seconds": self.rto_objective_seconds,
            "rto_state": self.rto_state,
            "last_backup_failed": self.last_backup_failed,
            "state": self.state,
            "state_reason": self.state_reason,
        }
