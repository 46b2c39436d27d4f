"""A tick's planning is linear in a region's points (issues #18, #21): each manifest is
decrypted once per process (immutable once written), and each planning step lists a
region's points once, whatever the number of instances. Counted in manifest GETs (one
decryption each) and listings, never timed. The distributed tick's count is in
tests/test_distributed_tick.py."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.jobs import BACKUP, COPY, JobStatus
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.site import Region, Site
from repository_support import ManifestReads, capture

EAST, WEST = "local:east", "local:west"
T0 = datetime(2026, 11, 25, 0, 1, tzinfo=UTC)
SETTINGS = RepositorySettings(pack_size=256 << 10, index_every_packs=2, workers=2)


def register(east: Region, tmp_path: Path, count: int) -> None:
    """``count`` small instances in east, each backed up daily and copied to west."""
    for i in range(count):
        root = tmp_path / "data" / f"nf-{i}"
        root.mkdir(parents=True)
        (root / "db.bin").write_bytes(i.to_bytes(4, "big") * 256)
        east.compute.register_instance(f"nf-{i}", root, tags={"backup": "1-7"})


def ran(report: object, kind: str) -> int:
    jobs = getattr(report, "jobs", [])
    return sum(1 for o in jobs if o.kind == kind and o.status is JobStatus.DONE)


@pytest.mark.parametrize("count", [4, 16])
def test_a_thread_tick_decrypts_each_manifest_about_once_and_lists_a_region_per_step(
    site: Site, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    register(east, tmp_path, count)
    reads = ManifestReads(monkeypatch)
    report = Service(Engine(site, clock=lambda: T0, settings=SETTINGS)).tick()
    assert report.ok, (report.problems, [o.error for o in report.failures()])
    # a point made in this tick is seen by the copy planning that follows it
    assert ran(report, BACKUP) == count and ran(report, COPY) == count
    # each region holds ``count`` points: each is decrypted by a listing (twice at most,
    # when the pool's two threads list the vault at once), and an east point once more to
    # be copied (the old code: count² and more, per step; 768 in east for 16)
    assert reads.gets[EAST] <= 3 * count + 4, reads.gets
    assert reads.gets[WEST] <= 2 * count + 4, reads.gets

    # the next tick, in a new process (nothing decrypted yet) and with nothing due, is
    # planning alone: one decryption per point, and a listing per region per step
    reads.reset()
    again = Service(Engine(site, clock=lambda: T0, settings=SETTINGS)).tick()
    assert again.ok and ran(again, BACKUP) == ran(again, COPY) == 0
    assert reads.gets == {EAST: count, WEST: count}, reads.gets
    # east: the schedule and copies_due (its points); west: copies_due (what it holds)
    assert reads.lists[EAST] <= 3 and reads.lists[WEST] <= 3, reads.lists


def test_a_listing_decrypts_only_new_manifests_and_never_returns_a_forgotten_point(
    site: Site, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"a" * 5000)
    repo = Repository.init_or_open(east.vault, east.keys, region=east.name, settings=SETTINGS)
    other = Repository.open(east.vault, east.keys, region=east.name, settings=SETTINGS)
    first = repo.backup(capture(data))
    reads = ManifestReads(monkeypatch)
    assert [p.id for p in other.points()] == [first.id]
    assert [p.id for p in other.points()] == [first.id]
    assert reads.gets[EAST] == 1  # the second listing decrypted nothing

    # another process adds a point, then forgets the first: this one sees both at once
    second = repo.backup(capture(data))
    repo.forget([first.id])
    reads.reset()
    assert [p.id for p in other.points()] == [second.id]
    assert reads.gets[EAST] == 1

    # a name written again (a scheduled point's id is its slot's: forgotten, then made
    # anew) is read again, not answered from what was decrypted before
    slot_id = repo.slot_point_id("i-test", "2026-11-25T00:00")
    old = repo.backup(capture(data), point_id=slot_id, expires_at=T0)
    assert {p.id: p.expires_at for p in other.points()}[slot_id] == T0
    repo.forget([slot_id])
    assert slot_id not in {p.id for p in other.points()}
    new = repo.backup(capture(data), point_id=slot_id, expires_at=None)
    assert new.id == old.id
    assert {p.id: p.expires_at for p in other.points()}[slot_id] is None
