"""The scheduler: which instances of a region are due for a backup, and for which slot.

An instance is *due* when its newest recovery point in its home region is at least its
policy's frequency old, or when it has none. The clock is injected (``now``), and so is the
way to find the newest recovery point (``newest_point_time``), so the scheduler itself does
no I/O beyond listing the region's instances.

Each due backup belongs to a *slot*: ``floor(now / frequency)``, counted from the Unix epoch
in UTC (a daily policy's slots start at 00:00 UTC; weekly ones on Thursdays, as the epoch
did). The slot is part of the backup job's key, so running the same job twice, or from two
runners, can never make two recovery points for one slot. Give ``newest_point_time`` the
*slot* a recovery point was made for, when the point records it, rather than the time it was
created: then an instance is due exactly when the current slot has no point, and a daily
backup stays at the start of its day instead of drifting later by up to one scheduler
interval every day.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from regionvault.core.errors import PolicyError, RegionVaultError
from regionvault.core.pipeline.jobs import Job, backup_job, format_slot, parse_slot, slot_of
from regionvault.core.pipeline.tagger import InstanceNote
from regionvault.core.policy import CopyTarget, Policy, resolve_policy
from regionvault.core.types import CaptureKind, Instance, RegionId, Tags

if TYPE_CHECKING:
    from regionvault.core.config import SiteConfig
    from regionvault.core.interfaces import Compute

__all__ = [
    "DueBackup",
    "NewestPointTime",
    "NotDue",
    "ScheduleReport",
    "due_instances",
    "is_due",
    "slot_of",
]

log = logging.getLogger(__name__)

NewestPointTime = Callable[["Instance"], "datetime | None"]


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RegionVaultError(f"{what} {moment.isoformat()} has no time zone (use UTC)")
    return moment.astimezone(UTC)


def is_due(newest: datetime | None, frequency: timedelta, now: datetime) -> bool:
    """True when a recovery point made at ``newest`` (None: never) is at least ``frequency``
    old at ``now``. A point from the future (clock skew) is not due."""
    if newest is None:
        return True
    return _aware(now, "now") - _aware(newest, "newest point time") >= frequency


@dataclass(frozen=True)
class DueBackup:
    """An instance to back up now, for ``slot``; its new points are copied to ``copy_to``."""

    instance: Instance
    policy: Policy
    slot: datetime
    #: the newest recovery point's time, None when there is none
    newest: datetime | None

    @property
    def region(self) -> str:
        return self.instance.region

    @property
    def copy_to(self) -> tuple[RegionId, ...]:
        return self.policy.copy_to

    @property
    def key(self) -> str:
        """The backup job's stable key: ``backup/<region>/<instance>/<slot>``."""
        return self.job().key

    def job(self) -> Job:
        """The backup as a :class:`Job` (plain data: what a handler needs to run it)."""
        payload: dict[str, Any] = {
            "instance_name": self.instance.name,
            "policy": self.policy.source,
            "frequency_s": int(self.policy.frequency.total_seconds()),
            "retention_s": int(self.policy.retention.total_seconds()),
            "copies": [
                {"region": str(t.region), "retention_s": int(t.retention.total_seconds())}
                for t in self.policy.copies
            ],
        }
        return backup_job(self.instance.region, self.instance.id, self.slot, payload)

    def __str__(self) -> str:
        last = self.newest.isoformat() if self.newest else "never"
        return (
            f"{self.instance.id} ({self.instance.name}): {self.policy}, slot "
            f"{format_slot(self.slot)}, last {last}"
        )


@dataclass(frozen=True)
class NotDue:
    instance: Instance
    policy: Policy
    newest: datetime
    #: the first moment it will be due
    next_due: datetime


@dataclass(frozen=True)
class ScheduleReport:
    """One scheduler pass over one region. Every instance listed appears in exactly one of
    ``due``, ``not_due``, ``opted_out``, ``malformed`` or ``failed``."""

    region: str
    now: datetime
    due: tuple[DueBackup, ...] = ()
    not_due: tuple[NotDue, ...] = ()
    opted_out: tuple[InstanceNote, ...] = ()
    malformed: tuple[InstanceNote, ...] = ()
    #: instances whose newest recovery point could not be found out
    failed: tuple[InstanceNote, ...] = ()

    def jobs(self) -> list[Job]:
        return [d.job() for d in self.due]

    def summary(self) -> str:
        return (
            f"{self.region}: due {len(self.due)}, not due {len(self.not_due)}, opted out "
            f"{len(self.opted_out)}, malformed {len(self.malformed)}, failed {len(self.failed)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data (what a ``plan-backups`` job returns to the tick
        that asked, from the region it ran in). An instance keeps its id, name, region, tags,
        state, function and capture kinds; its provider's ``extra`` facts stay behind."""
        return {
            "region": self.region,
            "now": self.now.isoformat(),
            "due": [
                {
                    "instance": _instance_dict(d.instance),
                    "policy": _policy_dict(d.policy),
                    "slot": format_slot(d.slot),
                    "newest": _iso(d.newest),
                }
                for d in self.due
            ],
            "not_due": [
                {
                    "instance": _instance_dict(n.instance),
                    "policy": _policy_dict(n.policy),
                    "newest": n.newest.isoformat(),
                    "next_due": n.next_due.isoformat(),
                }
                for n in self.not_due
            ],
            "opted_out": [_note_dict(n) for n in self.opted_out],
            "malformed": [_note_dict(n) for n in self.malformed],
            "failed": [_note_dict(n) for n in self.failed],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScheduleReport:
        """The inverse of :meth:`to_dict`."""
        try:
            return cls(
                region=str(data["region"]),
                now=datetime.fromisoformat(data["now"]),
                due=tuple(
                    DueBackup(
                        _instance_of(d["instance"]),
                        _policy_of(d["policy"]),
                        parse_slot(d["slot"]),
                        _when(d.get("newest")),
                    )
                    for d in data.get("due", ())
                ),
                not_due=tuple(
                    NotDue(
                        _instance_of(n["instance"]),
                        _policy_of(n["policy"]),
                        datetime.fromisoformat(n["newest"]),
                        datetime.fromisoformat(n["next_due"]),
                    )
                    for n in data.get("not_due", ())
                ),
                opted_out=tuple(_note_of(n) for n in data.get("opted_out", ())),
                malformed=tuple(_note_of(n) for n in data.get("malformed", ())),
                failed=tuple(_note_of(n) for n in data.get("failed", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RegionVaultError(f"schedule report data is not valid: {exc!r}") from None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _when(text: Any) -> datetime | None:
    return None if text is None else datetime.fromisoformat(str(text))


def _instance_dict(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "name": instance.name,
        "region": instance.region,
        "tags": dict(instance.tags),
        "state": instance.state,
        "function": instance.function,
        "capture_kinds": sorted(str(k) for k in instance.capture_kinds),
    }


def _instance_of(data: Mapping[str, Any]) -> Instance:
    return Instance(
        id=str(data["id"]),
        name=str(data["name"]),
        region=str(data["region"]),
        tags=Tags(data.get("tags") or {}),
        state=str(data.get("state", "running")),
        function=data.get("function"),
        capture_kinds=frozenset(CaptureKind(k) for k in data.get("capture_kinds", ())),
    )


def _policy_dict(policy: Policy) -> dict[str, Any]:
    return {
        "frequency_s": policy.frequency.total_seconds(),
        "retention_s": policy.retention.total_seconds(),
        "source": policy.source,
        "name": policy.name,
        "copies": [
            {"region": str(t.region), "retention_s": t.retention.total_seconds()}
            for t in policy.copies
        ],
        "from_default": policy.from_default,
        "completed": policy.completed,
    }


def _policy_of(data: Mapping[str, Any]) -> Policy:
    return Policy(
        frequency=timedelta(seconds=float(data["frequency_s"])),
        retention=timedelta(seconds=float(data["retention_s"])),
        source=str(data.get("source", "")),
        name=data.get("name"),
        copies=tuple(
            CopyTarget(RegionId.parse(str(c["region"])), timedelta(seconds=float(c["retention_s"])))
            for c in data.get("copies", ())
        ),
        from_default=bool(data.get("from_default", False)),
        completed=data.get("completed"),
    )


def _note_dict(note: InstanceNote) -> dict[str, str]:
    return {"instance_id": note.instance_id, "name": note.name, "reason": note.reason}


def _note_of(data: Mapping[str, Any]) -> InstanceNote:
    return InstanceNote(str(data["instance_id"]), str(data["name"]), str(data["reason"]))


def due_instances(
    compute: Compute,
    newest_point_time: NewestPointTime,
    site: SiteConfig,
    now: datetime,
    *,
    page_size: int = 100,
) -> ScheduleReport:
    """Which instances of ``compute``'s region are due at ``now`` (timezone-aware).

    ``newest_point_time(instance)`` returns the time of the instance's newest recovery point
    in its home region (better: the slot it was made for), or None when it has none. A
    malformed policy, an opt-out, or an error from ``newest_point_time`` is reported for that
    instance; the pass goes on.
    """
    now = _aware(now, "now")
    due: list[DueBackup] = []
    not_due: list[NotDue] = []
    opted_out: list[InstanceNote] = []
    malformed: list[InstanceNote] = []
    failed: list[InstanceNote] = []
    for instance in compute.list_instances(page_size=page_size):
        label = instance.name or instance.id
        try:
            policy = resolve_policy(instance, site)
        except PolicyError as exc:
            malformed.append(InstanceNote(instance.id, label, exc.message))
            continue
        if policy is None:
            opted_out.append(InstanceNote(instance.id, label, f"opted out ({site.tag_key}=none)"))
            continue
        try:
            newest = newest_point_time(instance)
            if newest is not None:
                newest = _aware(newest, "newest point time")
        except Exception as exc:
            # One instance's unreadable history must not stop the others' backups.
            if not isinstance(exc, RegionVaultError):
                log.exception("finding the newest recovery point of %s failed", instance.id)
            failed.append(
                InstanceNote(
                    instance.id, label, f"newest recovery point: {type(exc).__name__}: {exc}"
                )
            )
            continue
        if is_due(newest, policy.frequency, now):
            due.append(DueBackup(instance, policy, slot_of(now, policy.frequency), newest))
        else:
            assert newest is not None  # is_due is True for "never"
            not_due.append(NotDue(instance, policy, newest, newest + policy.frequency))
    return ScheduleReport(
        region=compute.region,
        now=now,
        due=tuple(due),
        not_due=tuple(not_due),
        opted_out=tuple(opted_out),
        malformed=tuple(malformed),
        failed=tuple(failed),
    )
