"""The event log in a region's vault (core/repository/_events.py, docs/format.md section 17):
one sealed object per event, in time order; verify authenticates each and names a damaged
one; prune and rebuild-index never touch them; nothing of an event is readable at rest."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from regionvault.core import Region
from regionvault.core.errors import IntegrityError
from regionvault.core.repository import EventAction, EventResult, Repository, current_actor
from regionvault.core.repository import _format as fmt
from repository_support import INSTANCE, capture, flip_bit, listing, object_path, repo_for

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def data(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"file-{seed}.bin").write_bytes(bytes([seed % 256]) * 50_000 + str(seed).encode())
    return root


def event_names(region: Region) -> list[str]:
    return listing(region, fmt.EVENT_PREFIX)


def test_events_are_sealed_objects_listed_in_time_order(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor("backup/local:east/i-test")
    # written out of time order: the log lists them by their time, not by when they came
    later = repo.record_event(EventAction.PRUNE, at=T0 + timedelta(hours=2), who=who)
    first = repo.record_event(
        EventAction.BACKUP,
        at=T0 + timedelta(hours=3),
        who=who,
        point="ab" * 16,
        instance=INSTANCE.id,
        detail={"bytes": 1234, "issues": 0, "policy": "1d-7d", "keys": ["k1", "k2"]},
    )
    failed = repo.record_event(
        EventAction.VERIFY,
        at=T0 + timedelta(hours=4),
        who=who,
        result=EventResult.FAILED,
        error="2 problem(s)",
        detail={"problems": 2},
    )
    names = event_names(east)
    assert names == [later.name, first.name, failed.name]
    assert all(n.startswith("events/20261207T") for n in names)
    read = repo.events()
    assert [e.name for e in read] == names
    backup = read[1]
    assert backup.action == "backup" and backup.result == "ok" and backup.error is None
    assert backup.point == "ab" * 16 and backup.instance == INSTANCE.id
    assert backup.at == T0 + timedelta(hours=3)
    assert dict(backup.detail) == {
        "bytes": 1234,
        "issues": 0,
        "policy": "1d-7d",
        "keys": ["k1", "k2"],
    }
    assert backup.who["job"] == "backup/local:east/i-test"
    assert backup.who["user"].endswith("@" + socket.gethostname())
    assert isinstance(backup.who["pid"], int)
    assert read[2].result == "failed" and read[2].error == "2 problem(s)"
    # since: only the events at or after it
    assert [e.name for e in repo.events(T0 + timedelta(hours=3))] == names[1:]
    # another process (a new Repository object) reads the same log
    again = Repository.open(east.vault, east.keys, region=east.name)
    assert [e.to_dict() for e in again.events()] == [e.to_dict() for e in read]


def test_two_events_in_one_instant_keep_the_order_they_were_recorded_in(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    made = [repo.record_event(EventAction.COPY, at=T0, who=who, detail={"n": i}) for i in range(5)]
    assert [e.detail["n"] for e in repo.events()] == [0, 1, 2, 3, 4]
    assert len({e.name for e in made}) == 5


def test_bad_events_are_refused_naming_what_is_wrong(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    with pytest.raises(ValueError, match="unknown event action 'backpu'"):
        repo.record_event("backpu", at=T0, who=who)
    with pytest.raises(ValueError, match="unknown event result 'maybe'"):
        repo.record_event(EventAction.BACKUP, at=T0, who=who, result="maybe")
    with pytest.raises(ValueError, match="'rto' is a float"):
        repo.record_event(EventAction.RESTORE, at=T0, who=who, detail={"rto": 1.5})
    with pytest.raises(ValueError, match="timezone-aware"):
        repo.record_event(EventAction.BACKUP, at=datetime(2026, 12, 7), who=who)
    assert event_names(east) == []


def test_verify_names_a_flipped_bit_in_an_event_and_keeps_it(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    events = [
        repo.record_event(EventAction.BACKUP, at=T0 + timedelta(minutes=i), who=who)
        for i in range(3)
    ]
    report = repo.verify()
    assert report.ok and report.events == 3
    damaged = events[1].name
    flip_bit(object_path(east, damaged), 200)
    report = repo.verify()
    assert not report.ok
    assert [p.object for p in report.errors] == [damaged]
    assert "kept" in report.errors[0].message
    # the log itself names it too, or leaves it out when asked to
    with pytest.raises(IntegrityError, match=damaged):
        repo.events()
    problems: list = []
    assert [e.name for e in repo.events(problems=problems)] == [events[0].name, events[2].name]
    assert [p.object for p in problems] == [damaged]
    # repair never removes evidence: the damaged event stays, and verify stays failed
    repaired = repo.verify(repair=True)
    assert damaged in event_names(east) and not repaired.ok


def test_an_event_moved_to_another_name_does_not_authenticate(east: Region) -> None:
    repo = repo_for(east)
    event = repo.record_event(EventAction.FORGET, at=T0, who=current_actor())
    moved = fmt.event_name(T0 - timedelta(days=1), fmt.new_id())
    east.vault.put(moved, east.vault.get(event.name))
    problems: list = []
    assert [e.name for e in repo.events(problems=problems)] == [event.name]
    assert [p.object for p in problems] == [moved]


def test_prune_and_rebuild_index_keep_every_event(east: Region, tmp_path: Path) -> None:
    repo = repo_for(east)
    who = current_actor()
    first = repo.backup(capture(data(tmp_path / "a", 1)))
    repo.record_event(EventAction.BACKUP, at=T0, who=who, point=first.id)
    second = repo.backup(capture(data(tmp_path / "b", 2)))
    repo.record_event(EventAction.BACKUP, at=T0 + timedelta(hours=1), who=who, point=second.id)
    repo.forget([first.id])
    repo.record_event(EventAction.FORGET, at=T0 + timedelta(hours=2), who=who, point=first.id)
    before = event_names(east)
    assert len(before) == 3
    packs = listing(east, fmt.PACK_PREFIX)
    report = repo.prune()
    assert report.packs_deleted >= 1 and listing(east, fmt.PACK_PREFIX) != packs
    assert event_names(east) == before
    assert repo.rebuild_index() >= 1
    assert event_names(east) == before
    verified = repo.verify(read_data=True)
    assert verified.ok and verified.events == 3
    assert [e.action for e in repo.events()] == ["backup", "backup", "forget"]


def test_nothing_of_an_event_is_readable_at_rest(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor("backup/local:east/i-secret-instance")
    point = "cd" * 16
    repo.record_event(
        EventAction.BACKUP,
        at=T0,
        who=who,
        point=point,
        instance="i-secret-instance",
        error=None,
        detail={"instance_name": "vcu-secret-name", "bytes": 987654321},
    )
    (name,) = event_names(east)
    raw = object_path(east, name).read_bytes()
    assert raw[:4] == b"RVLT" and raw[5] == fmt.ObjectKind.EVENTS == 7
    needles = [
        b"i-secret-instance",
        b"vcu-secret-name",
        point.encode(),
        b"987654321",
        b"backup",
        who["user"].encode(),
        json.dumps(who["pid"]).encode() + b",",
    ]
    assert [n for n in needles if n in raw] == []
