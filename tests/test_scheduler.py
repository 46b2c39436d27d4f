"""The scheduler with an injected clock: never backed up, due, just not due, the boundary;
stable slots; malformed, opted-out and unreadable instances reported, never fatal."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from regionvault.core import Region, Site
from regionvault.core.errors import RegionVaultError, VaultError
from regionvault.core.pipeline.jobs import format_slot, slot_of
from regionvault.core.pipeline.scheduler import due_instances, is_due
from regionvault.core.types import Instance, RegionId

NOW = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
DAY = timedelta(days=1)
WEST = RegionId("local", "west")


def add(region: Region, tmp_path: Path, name: str, tags: Mapping[str, str] | None = None) -> str:
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    return region.compute.register_instance(name, data, tags=tags).id


def newest_from(points: Mapping[str, datetime | None]) -> Callable[[Instance], datetime | None]:
    def newest(instance: Instance) -> datetime | None:
        return points.get(instance.id)

    return newest


def test_never_backed_up_is_due_with_its_slot_and_copies(
    site: Site, east: Region, tmp_path: Path
) -> None:
    vm = add(east, tmp_path, "vcu-1", {"backup": "1-7"})
    report = due_instances(east.compute, lambda i: None, site.config, NOW)
    (due,) = report.due
    assert due.instance.id == vm
    assert due.newest is None
    assert due.slot == datetime(2026, 11, 25, tzinfo=UTC)
    assert due.key == f"backup/local:east/{vm}/2026-11-25T00:00Z"
    assert due.copy_to == (WEST,)
    job = due.job()
    assert (job.kind, job.region) == ("backup", "local:east")
    assert job.payload["instance_id"] == vm
    assert job.payload["copies"] == [{"region": "local:west", "retention_s": 7 * 86400}]


@pytest.mark.parametrize(
    ("age", "due"),
    [
        (timedelta(days=3), True),
        (DAY + timedelta(seconds=1), True),
        (DAY, True),  # the boundary: exactly one frequency old is due
        (DAY - timedelta(microseconds=1), False),  # just not due
        (timedelta(hours=1), False),
        (timedelta(0), False),
        (-timedelta(hours=1), False),  # a point from the future (clock skew)
    ],
)
def test_due_by_age_of_newest_point(
    site: Site, east: Region, tmp_path: Path, age: timedelta, due: bool
) -> None:
    vm = add(east, tmp_path, "vcu-1", {"backup": "1-7"})
    newest = NOW - age
    report = due_instances(east.compute, newest_from({vm: newest}), site.config, NOW)
    assert [d.instance.id for d in report.due] == ([vm] if due else [])
    if not due:
        (waiting,) = report.not_due
        assert waiting.next_due == newest + DAY
        assert is_due(newest, DAY, waiting.next_due)


def test_each_instance_by_its_own_frequency(site: Site, east: Region, tmp_path: Path) -> None:
    fast = add(east, tmp_path, "fast", {"backup": "30m-6h"})
    slow = add(east, tmp_path, "slow", {"backup": "1w-4w"})
    last = NOW - timedelta(hours=2)
    report = due_instances(east.compute, newest_from({fast: last, slow: last}), site.config, NOW)
    assert [d.instance.id for d in report.due] == [fast]
    assert report.due[0].slot == datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    assert [n.instance.id for n in report.not_due] == [slow]


def test_untagged_instances_follow_the_site_default(
    site: Site, east: Region, tmp_path: Path
) -> None:
    vm = add(east, tmp_path, "vcu-1")
    config = dataclasses.replace(site.config, default_policy="12h-2d")
    (due,) = due_instances(east.compute, lambda i: None, config, NOW).due
    assert due.instance.id == vm
    assert due.policy.frequency == timedelta(hours=12) and due.policy.from_default
    assert due.slot == datetime(2026, 11, 25, tzinfo=UTC)


def test_problems_are_reported_per_instance(site: Site, east: Region, tmp_path: Path) -> None:
    good = add(east, tmp_path, "a-good", {"backup": "1-7"})
    out = add(east, tmp_path, "b-out", {"backup": "none"})
    bad = add(east, tmp_path, "c-bad", {"backup": "0-7"})
    unreadable = add(east, tmp_path, "d-unreadable", {"backup": "1-7"})
    naive = add(east, tmp_path, "e-naive", {"backup": "1-7"})
    buggy = add(east, tmp_path, "f-buggy", {"backup": "1-7"})

    def newest(instance: Instance) -> datetime | None:
        if instance.id == unreadable:
            raise VaultError("index unreadable", region="local:east")
        if instance.id == naive:
            return datetime(2026, 11, 24, 10, 30)
        if instance.id == buggy:
            raise KeyError("oops")
        return None

    report = due_instances(east.compute, newest, site.config, NOW)
    assert [d.instance.id for d in report.due] == [good]
    assert [n.instance_id for n in report.opted_out] == [out]
    assert [n.instance_id for n in report.malformed] == [bad]
    assert "frequency '0' is zero" in report.malformed[0].reason
    assert [n.instance_id for n in report.failed] == [unreadable, naive, buggy]
    assert "index unreadable" in report.failed[0].reason
    assert "no time zone" in report.failed[1].reason
    assert report.summary() == "local:east: due 1, not due 0, opted out 1, malformed 1, failed 3"


def test_now_must_be_timezone_aware(site: Site, east: Region) -> None:
    with pytest.raises(RegionVaultError, match="no time zone"):
        due_instances(east.compute, lambda i: None, site.config, datetime(2026, 11, 25))


def test_slots_are_stable_within_a_slot(site: Site, east: Region, tmp_path: Path) -> None:
    add(east, tmp_path, "vcu-1", {"backup": "12h-2d"})
    keys = set()
    for minutes in (0, 5, 17, 719):  # 12:00 .. 23:59, one slot
        moment = datetime(2026, 11, 25, 12, tzinfo=UTC) + timedelta(minutes=minutes)
        keys.update(
            d.key for d in due_instances(east.compute, lambda i: None, site.config, moment).due
        )
    assert len(keys) == 1
    assert keys.pop().endswith("/2026-11-25T12:00Z")
    later = datetime(2026, 11, 26, tzinfo=UTC)
    (next_slot,) = due_instances(east.compute, lambda i: None, site.config, later).due
    assert next_slot.key.endswith("/2026-11-26T00:00Z")


def test_slots_do_not_depend_on_the_time_zone_of_now() -> None:
    from zoneinfo import ZoneInfo

    local = NOW.astimezone(ZoneInfo("Asia/Kolkata"))
    assert slot_of(local, DAY) == slot_of(NOW, DAY)
    assert format_slot(slot_of(local, DAY)) == "2026-11-25T00:00Z"


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(min_value=5, max_value=60 * 24 * 7 * 8).map(lambda m: timedelta(minutes=m)),
)
def test_slot_holds_its_moment_and_is_the_same_for_every_moment_in_it(
    moment: datetime, every: timedelta
) -> None:
    slot = slot_of(moment, every)
    assert slot <= moment < slot + every
    assert slot_of(slot, every) == slot
    assert slot_of(slot + every - timedelta(microseconds=1), every) == slot


def test_a_daily_backup_does_not_drift_when_points_record_their_slot(
    site: Site, east: Region, tmp_path: Path
) -> None:
    """Ticks every 5 minutes from an odd offset, for three days: newest point time = the slot
    it was made for, so there is one backup per day, each in the first tick of its day."""
    vm = add(east, tmp_path, "vcu-1", {"backup": "1-7"})
    points: dict[str, datetime | None] = {}
    made: list[tuple[datetime, datetime]] = []
    start = datetime(2026, 11, 25, 0, 3, tzinfo=UTC)
    for tick in range(3 * 24 * 12):
        now = start + tick * timedelta(minutes=5)
        for due in due_instances(east.compute, newest_from(points), site.config, now).due:
            made.append((now, due.slot))
            points[vm] = due.slot
    assert [slot for _, slot in made] == [
        datetime(2026, 11, 25, tzinfo=UTC),
        datetime(2026, 11, 26, tzinfo=UTC),
        datetime(2026, 11, 27, tzinfo=UTC),
    ]
    assert all(now - slot < timedelta(minutes=5) for now, slot in made[1:])
