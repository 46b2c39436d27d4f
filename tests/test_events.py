"""The event log in a region's vault (core/repository/_events.py, docs/format.md section 17):
one sealed object per event, numbered in the order written and chained; verify authenticates
each and names a damaged, deleted or replaced one; WORM refuses a delete; prune and
rebuild-index never touch them; nothing of an event is readable at rest, not even its size."""

from __future__ import annotations

import json
import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from regionvault.core import Region
from regionvault.core.errors import IntegrityError, RetentionLocked
from regionvault.core.repository import EventAction, EventResult, Repository, _events, current_actor
from regionvault.core.repository import _format as fmt
from regionvault.core.repository._events import (
    EVENT_PAD,
    EVENT_RETAIN,
    EventError,
    event_seq_name,
    forget_tail,
    read_event_log,
)
from regionvault.core.types import RetentionMode
from repository_support import INSTANCE, capture, flip_bit, listing, object_path, repo_for
from site_support import open_site

T0 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def data(root: Path, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"file-{seed}.bin").write_bytes(bytes([seed % 256]) * 50_000 + str(seed).encode())
    return root


def event_names(region: Region) -> list[str]:
    return listing(region, fmt.EVENT_PREFIX)


def test_events_are_sealed_objects_listed_in_the_order_written(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor("backup/local:east/i-test")
    # the writer's clock is data: the order is the sequence, whatever the clocks said
    later = repo.record_event(EventAction.PRUNE, at=T0 + timedelta(hours=2), who=who)
    first = repo.record_event(
        EventAction.BACKUP,
        at=T0 + timedelta(hours=1),
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
    assert names == [f"events/{i:016x}" for i in range(3)]
    read = repo.events()
    assert [e.name for e in read] == names and [e.seq for e in read] == [0, 1, 2]
    backup = read[1]
    assert backup.action == "backup" and backup.result == "ok" and backup.error is None
    assert backup.point == "ab" * 16 and backup.instance == INSTANCE.id
    assert backup.at == T0 + timedelta(hours=1)
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
    # since: from the first event at or after it
    assert [e.name for e in repo.events(T0 + timedelta(hours=3))] == names[2:]
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
    with pytest.raises(EventError, match="unknown event action 'backpu'"):
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
    moved = event_seq_name(1)
    east.vault.put(moved, east.vault.get(event.name))
    problems: list = []
    assert [e.name for e in repo.events(problems=problems)] == [event.name]
    assert [p.object for p in problems] == [moved]
    assert "authenticat" in problems[0].message


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


def test_a_deleted_event_is_a_gap_that_verify_names(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    made = [
        repo.record_event(EventAction.VERIFY, at=T0 + timedelta(minutes=i), who=who)
        for i in range(5)
    ]
    assert repo.verify().ok
    # one deleted by someone who may bypass the WORM lock (here: its file removed)
    object_path(east, made[1].name).unlink()
    object_path(east, made[2].name).unlink()
    report = repo.verify()
    assert not report.ok
    assert [(p.object, p.message) for p in report.errors] == [
        (made[3].name, "events 1 to 2 of the log missing (deleted?) (an event of the log: "
         "kept, never repaired away)"),
    ]  # fmt: skip
    with pytest.raises(IntegrityError, match="events 1 to 2 of the log missing"):
        repo.events()
    # the first event gone: the log must start at 0
    object_path(east, made[0].name).unlink()
    problems: list = []
    assert [e.seq for e in repo.events(problems=problems)] == [3, 4]
    assert [p.message for p in problems] == ["events 0 to 2 of the log missing (deleted?)"]


def test_a_replaced_event_breaks_the_chain(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    made = [repo.record_event(EventAction.BACKUP, at=T0, who=who) for _ in range(3)]
    # an insider with the master key writes a new event 1 in place of the real one: it
    # authenticates, but event 2 names the digest of the one it followed
    object_path(east, made[1].name).unlink()
    store = repo._ensure_open()
    forged = json.dumps(
        {
            "at": T0.isoformat(),
            "action": "backup",
            "who": {},
            "subject": {},
            "result": "ok",
            "error": None,
            "detail": {},
            "seq": 1,
            "prev": made[1].prev,
        }
    ).encode()
    store.put_sealed(fmt.ObjectKind.EVENTS, made[1].name, forged)
    problems: list = []
    assert len(repo.events(problems=problems)) == 3
    assert [(p.object, p.message) for p in problems] == [
        (made[2].name, "event 2's prev is not event 1's digest (the one before it was replaced)")
    ]


def test_two_writers_never_share_a_number_and_keep_the_chain(
    east: Region, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = repo_for(east)
    other = Repository.open(east.vault, east.keys, region=east.name)
    who = current_actor()
    one.record_event(EventAction.BACKUP, at=T0, who=who)  # this process now knows seq 0
    stale = _events._TAIL[east.vault.vault_id]
    forget_tail(east.vault.vault_id)  # the other writer is another process: it lists
    other.record_event(EventAction.COPY, at=T0, who=who)
    _events._TAIL[east.vault.vault_id] = stale  # back in the first process: it knows 0
    # the first writer's cache is stale: it finds number 1 taken and takes 2, listing the
    # log only from the taken number's block on, not from its start
    listed: list[str] = []
    real_list = east.vault.list

    def counting_list(prefix: str = "") -> Any:
        listed.append(prefix)
        return real_list(prefix)

    monkeypatch.setattr(east.vault, "list", counting_list)
    third = one.record_event(EventAction.PRUNE, at=T0, who=who)
    monkeypatch.undo()
    assert third.seq == 2
    assert listed == ["events/0000000000000", "events/0000000000001"]
    log = read_event_log(one._ensure_open())
    assert log.problems == []
    assert [(e.seq, e.action) for e in log.events] == [(0, "backup"), (1, "copy"), (2, "prune")]


def test_events_are_locked_where_the_vault_has_worm(east: Region) -> None:
    assert east.vault.capabilities.worm_lock  # the local provider has it
    repo = repo_for(east)
    event = repo.record_event(EventAction.FORGET, at=T0, who=current_actor())
    info = east.vault.head(event.name)
    assert info.retention_mode == RetentionMode.GOVERNANCE
    assert info.retain_until is not None and info.retain_until >= T0 + EVENT_RETAIN
    with pytest.raises(RetentionLocked):
        east.vault.delete(event.name)
    assert event_names(east) == [event.name]


def test_event_bodies_are_padded_so_their_size_does_not_tell_the_action(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor("backup/local:east/i-0123456789")
    repo.record_event(EventAction.PRUNE, at=T0, who=who, detail={"packs_deleted": 0})
    repo.record_event(EventAction.VERIFY, at=T0, who=who, detail={"problems": 0})
    repo.record_event(
        EventAction.COPY, at=T0, who=who, point="ab" * 16, instance="i-0123456789",
        detail={"role": "destination", "source": "local:west", "bytes": 123456},
    )  # fmt: skip
    store = repo._ensure_open()
    sizes = set()
    for name in event_names(east):
        body = store.get_sealed(fmt.ObjectKind.EVENTS, name)
        assert len(body) % EVENT_PAD == 0
        sizes.add(object_path(east, name).stat().st_size)
    assert len(sizes) == 1  # these three fall in one bucket


def test_since_reads_only_from_the_first_event_at_or_after_it(east: Region) -> None:
    repo = repo_for(east)
    who = current_actor()
    for i in range(200):
        repo.record_event(EventAction.PRUNE, at=T0 + timedelta(minutes=i), who=who)
    log = read_event_log(repo._ensure_open(), T0 + timedelta(minutes=190))
    assert log.problems == [] and log.listed == 200
    assert [e.seq for e in log.events] == list(range(190, 200)) and log.first_seq == 190
    # a bisection (at most 9 fetches for 200) plus the ten read and the one before them
    assert log.fetched <= 9 + 10 + 1
    assert read_event_log(repo._ensure_open()).fetched == 200


def test_a_copy_of_the_vault_elsewhere_keeps_its_own_numbers(
    east: Region, site_file: Path, tmp_path: Path
) -> None:
    repo = repo_for(east)
    repo.record_event(EventAction.BACKUP, at=T0, who=current_actor())
    # a copy of the whole site (the same vault id), opened in this same process
    copied = tmp_path / "copied"
    shutil.copytree(site_file.parent, copied, ignore=shutil.ignore_patterns("copied"))
    with open_site(copied / site_file.name) as other_site:
        other = other_site.region("east")
        assert other.vault.vault_id == east.vault.vault_id
        repo.record_event(EventAction.PRUNE, at=T0, who=current_actor())  # the original: 1
        there = Repository.open(other.vault, other.keys, region=other.name)
        made = there.record_event(EventAction.VERIFY, at=T0, who=current_actor())
        assert made.seq == 1  # its own log's next, not the original's (2)
        problems: list = []
        assert [e.action for e in there.events(problems=problems)] == ["backup", "verify"]
        assert problems == []
