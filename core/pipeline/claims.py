"""No instance is backed up by two regions of a site.

The site refuses two regions whose settings say they list the same instances (two regions on
one cloud region, one of them whole or both on one zone: :func:`~regionvault.core.config.
check_region_claims`). What settings cannot tell (two profiles reaching one account, two
endpoints of one cloud) the tick sees: an instance listed by two regions' schedules is backed
up by neither, each schedule reports it as failed, and the tick names it in one line. The
next tick backs it up again once one region stops listing it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from regionvault.core.pipeline.jobs import BACKUP
from regionvault.core.pipeline.tagger import InstanceNote

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from regionvault.core.config import SiteConfig
    from regionvault.core.pipeline.jobs import Job
    from regionvault.core.pipeline.scheduler import ScheduleReport

__all__ = ["claimed_twice", "refuse_claimed_twice", "without_refused"]


def _listed(schedule: ScheduleReport) -> Iterable[str]:
    yield from (d.instance.id for d in schedule.due)
    yield from (n.instance.id for n in schedule.not_due)
    for notes in (schedule.opted_out, schedule.malformed, schedule.failed):
        yield from (note.instance_id for note in notes)


def claimed_twice(schedules: Sequence[ScheduleReport], site: SiteConfig) -> dict[str, list[str]]:
    """Each instance id that two or more regions on one compute provider listed, with the
    regions (sorted)."""
    listed: dict[tuple[str, str], set[str]] = {}
    for schedule in schedules:
        region = site.regions.get(schedule.region)
        provider = region.services["compute"].provider if region is not None else ""
        for instance_id in _listed(schedule):
            listed.setdefault((provider, instance_id), set()).add(schedule.region)
    return {
        instance_id: sorted(regions)
        for (_provider, instance_id), regions in sorted(listed.items())
        if len(regions) > 1
    }


def refuse_claimed_twice(
    schedules: Sequence[ScheduleReport], site: SiteConfig
) -> tuple[list[ScheduleReport], list[str]]:
    """``schedules`` with every instance that two regions listed moved from due (or not due)
    to failed in each, and one problem line per such instance."""
    twice = claimed_twice(schedules, site)
    if not twice:
        return list(schedules), []
    out: list[ScheduleReport] = []
    for schedule in schedules:
        refused: list[InstanceNote] = []

        def note(instance_id: str, label: str, region: str = schedule.region) -> InstanceNote:
            others = ", ".join(r for r in twice[instance_id] if r != region)
            return InstanceNote(
                instance_id, label, f"also listed by {others}: not backed up by either region"
            )

        due = []
        for entry in schedule.due:
            if entry.instance.id in twice:
                refused.append(note(entry.instance.id, entry.instance.name or entry.instance.id))
            else:
                due.append(entry)
        not_due = []
        for waiting in schedule.not_due:
            if waiting.instance.id in twice:
                label = waiting.instance.name or waiting.instance.id
                refused.append(note(waiting.instance.id, label))
            else:
                not_due.append(waiting)
        out.append(
            replace(
                schedule,
                due=tuple(due),
                not_due=tuple(not_due),
                failed=(*schedule.failed, *refused),
            )
            if refused
            else schedule
        )
    problems = [
        f"instance {instance_id} is listed by regions {' and '.join(regions)}: not backed up "
        "until one region stops listing it (give each region its own availability zone)"
        for instance_id, regions in twice.items()
    ]
    return out, problems


def without_refused(jobs: Iterable[Job], schedules: Sequence[ScheduleReport]) -> list[Job]:
    """``jobs`` less the backups of instances the refused ``schedules`` no longer hold due."""
    due = {(s.region, d.instance.id) for s in schedules for d in s.due}
    return [
        job
        for job in jobs
        if job.kind != BACKUP or (job.region, job.payload.get("instance_id")) in due
    ]
