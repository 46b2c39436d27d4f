"""No instance is backed up by two regions of a site.

The site refuses two regions whose settings say they list the same instances (two regions on
one cloud region, one of them whole or both on one zone: :func:`~regionvault.core.config.
check_region_claims`). What settings cannot tell (two profiles reaching one account, two
endpoints of one cloud) the tick sees: an instance listed by two regions' schedules is backed
up by neither, each schedule reports it as failed, and the tick names it in one line. The
next tick backs it up again once one region stops listing it.

Only regions that could list one instance are compared: same compute provider and, where both
know their :class:`~regionvault.core.interfaces.ComputeScope`, same location and compatible
zones (the account is ignored: it is what settings cannot tell). An instance id is unique only
there (a GCE name only per project and zone): same-named VMs in two zones are two VMs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from regionvault.core.pipeline.jobs import BACKUP
from regionvault.core.pipeline.tagger import InstanceNote

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from regionvault.core.config import SiteConfig
    from regionvault.core.interfaces import ComputeScope
    from regionvault.core.pipeline.jobs import Job
    from regionvault.core.pipeline.scheduler import ScheduleReport
    from regionvault.core.plugins import ProviderRegistry

__all__ = [
    "CLAIM_ADVICE",
    "claimed_twice",
    "compute_scopes",
    "listed_twice",
    "refuse_claimed_twice",
    "without_refused",
]

#: what to do when two regions list one instance, whatever the cause
CLAIM_ADVICE = (
    "make the regions list disjoint instances: their own zone, cloud region, "
    "project/account or credentials, or merge them"
)


def _listed(schedule: ScheduleReport) -> Iterable[str]:
    yield from (d.instance.id for d in schedule.due)
    yield from (n.instance.id for n in schedule.not_due)
    for notes in (schedule.opted_out, schedule.malformed, schedule.failed):
        yield from (note.instance_id for note in notes)


def compute_scopes(site: SiteConfig, registry: ProviderRegistry) -> dict[str, ComputeScope | None]:
    """Each region's :class:`ComputeScope` (None where its provider cannot say)."""
    return {
        name: registry.get(region.services["compute"].provider).compute_scope(
            region.for_service("compute")
        )
        for name, region in site.regions.items()
    }


def _may_share(a: ComputeScope | None, b: ComputeScope | None) -> bool:
    """Whether two regions on one compute provider could list one instance at runtime: yes
    unless both scopes are known and differ in location or zone (the account is ignored)."""
    if a is None or b is None:
        return True
    return (a.provider, a.location) == (b.provider, b.location) and (
        a.zone is None or b.zone is None or a.zone == b.zone
    )


def listed_twice(
    listings: Mapping[str, Iterable[str]],
    site: SiteConfig,
    scopes: Mapping[str, ComputeScope | None],
) -> dict[str, dict[str, list[str]]]:
    """Each instance id that two regions that may share instances listed (``listings``: the
    ids each region listed): for each such region, the other regions (sorted) that listed it
    too."""
    listed: dict[tuple[str, str], set[str]] = {}
    for name, ids in listings.items():
        region = site.regions.get(name)
        provider = region.services["compute"].provider if region is not None else ""
        for instance_id in ids:
            listed.setdefault((provider, instance_id), set()).add(name)
    out: dict[str, dict[str, list[str]]] = {}
    for (_provider, instance_id), regions in sorted(listed.items()):
        if len(regions) < 2:
            continue
        ordered = sorted(regions)
        for name in ordered:
            partners = [
                other
                for other in ordered
                if other != name and _may_share(scopes.get(name), scopes.get(other))
            ]
            if partners:
                out.setdefault(instance_id, {})[name] = partners
    return out


def _claims(
    schedules: Sequence[ScheduleReport],
    site: SiteConfig,
    scopes: Mapping[str, ComputeScope | None],
) -> dict[str, dict[str, list[str]]]:
    listings: dict[str, list[str]] = {}
    for schedule in schedules:
        listings.setdefault(schedule.region, []).extend(_listed(schedule))
    return listed_twice(listings, site, scopes)


def claimed_twice(
    schedules: Sequence[ScheduleReport],
    site: SiteConfig,
    scopes: Mapping[str, ComputeScope | None],
) -> dict[str, list[str]]:
    """Each instance id that two or more regions that may share instances (same compute
    provider; where both ``scopes`` are known, same location and compatible zones) listed,
    with those regions (sorted)."""
    return {
        instance_id: sorted(by_region)
        for instance_id, by_region in _claims(schedules, site, scopes).items()
    }


def refuse_claimed_twice(
    schedules: Sequence[ScheduleReport],
    site: SiteConfig,
    scopes: Mapping[str, ComputeScope | None],
) -> tuple[list[ScheduleReport], list[str]]:
    """``schedules`` with every instance that two regions listed moved from due (or not due)
    to failed in each, and one problem line per such instance."""
    claims = _claims(schedules, site, scopes)
    if not claims:
        return list(schedules), []
    out: list[ScheduleReport] = []
    for schedule in schedules:
        refused: list[InstanceNote] = []

        def note(instance_id: str, label: str, region: str = schedule.region) -> InstanceNote:
            others = ", ".join(claims[instance_id][region])
            return InstanceNote(
                instance_id, label, f"also listed by {others}: not backed up by either region"
            )

        due = []
        for entry in schedule.due:
            if schedule.region in claims.get(entry.instance.id, {}):
                refused.append(note(entry.instance.id, entry.instance.name or entry.instance.id))
            else:
                due.append(entry)
        not_due = []
        for waiting in schedule.not_due:
            if schedule.region in claims.get(waiting.instance.id, {}):
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
        f"instance {instance_id} is listed by regions {' and '.join(sorted(by_region))}: not "
        f"backed up until one region stops listing it ({CLAIM_ADVICE})"
        for instance_id, by_region in claims.items()
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
