"""The audit report (core/pipeline/audit.py, docs/audit.md) and the events the engine records
(Engine.record_event): a compliant and a non-compliant instance pass and fail exactly the
controls expected, with evidence; the event log lists every step in order; the command's
exit status follows the controls."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from regionvault.core import Region, Site
from regionvault.core.errors import RetentionLocked
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.acting import acting_for
from regionvault.core.pipeline.audit import audit, parse_since
from regionvault.core.repository import RepositorySettings
from regionvault.core.repository import _format as fmt
from regionvault.core.types import RetentionMode
from repository_support import flip_bit, object_path
from site_support import open_site, site_toml

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)


class Clock:
    """An injected clock that starts at the real time (points record real commit times)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml(settings={"state_dir": "state"}))
    with open_site(path) as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(site: Site, clock: Clock) -> Engine:
    return Engine(site, clock=clock, settings=SETTINGS, health_timeout=20.0)


def add(region: Region, name: str, tmp_path: Path, seed: int, **tags: str) -> Any:
    root = tmp_path / "data" / name
    root.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(3):
        (root / f"{name}-{i}.bin").write_bytes(rng.randbytes(40_000))
    (root / "conf.txt").write_text(f"{name} {seed}\n")
    return region.compute.register_instance(name, root, tags=tags)


def controls(report_json: dict[str, Any], name: str) -> dict[tuple[str, str], dict[str, Any]]:
    (inst,) = [i for i in report_json["instances"] if i["instance_name"] == name]
    found = {(c["control"], c["region"].split(":")[1]): c for c in inst["controls"]}
    assert len(found) == len(inst["controls"])  # one control per name and region
    return found


def statuses(found: dict[tuple[str, str], dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {key: c["status"] for key, c in found.items()}


def test_a_compliant_and_a_non_compliant_instance(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    lock = {"backup-lock": "compliance-30d"}
    bad = add(east, "stale-nf", tmp_path, 1, backup="1h-7d", **lock)
    good = add(east, "good-nf", tmp_path, 2, backup="1-7", **lock, **{"backup-drill": "7d",
               "backup-rto": "15m"})  # fmt: skip
    stale = engine.backup(bad.id)
    clock.advance(hours=3)  # the stale instance's hourly backups stop here
    point = engine.backup(good.id)
    copy = engine.copy(point.id, to="west").point
    # locked as its tag asks (the lock by policy at commit is another part's: applied here
    # through the same Repository.protect)
    for region, p in (("east", point), ("west", copy)):
        engine.repository(region).protect(p.id, until=p.created_at + timedelta(days=30))
    drill = engine.restore(copy.id, region="west", launch=True)
    assert drill.healthy and drill.instance is not None
    west.compute.terminate(drill.instance.id)  # a drill tears its instance down
    for region in ("east", "west"):
        assert engine.verify(region).ok

    report = audit(engine)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["ok"] is False and doc["failed"] == 2
    good_controls = controls(doc, "good-nf")
    assert statuses(good_controls) == {
        ("backed_up", "east"): "passed",
        ("retained", "east"): "passed",
        ("retained", "west"): "passed",
        ("copied", "west"): "passed",
        ("copy_encrypted", "west"): "passed",
        ("locked", "east"): "passed",
        ("locked", "west"): "passed",
        ("drilled", "west"): "passed",
        ("verified", "east"): "passed",
        ("verified", "west"): "passed",
    }
    bad_controls = controls(doc, "stale-nf")
    assert statuses(bad_controls) == {
        ("backed_up", "east"): "failed",
        ("retained", "east"): "passed",
        ("retained", "west"): "not_applicable",
        ("copied", "west"): "failed",
        ("copy_encrypted", "west"): "not_applicable",
        ("locked", "east"): "passed",  # the policy's lock is applied at commit
        ("locked", "west"): "not_applicable",
        ("drilled", "east"): "not_applicable",
        ("verified", "east"): "passed",
        ("verified", "west"): "passed",
    }
    # evidence: what each control looked at
    backed = good_controls["backed_up", "east"]["evidence"]
    assert backed["newest_point"] == point.id and backed["limit_seconds"] == 86400 + 300
    late = bad_controls["backed_up", "east"]["evidence"]
    assert late["newest_point"] == stale.id and late["age_seconds"] > 3600 + 300
    copied = good_controls["copied", "west"]["evidence"]
    assert (copied["newest_copy"], copied["source_point"]) == (copy.id, point.id)
    assert backed["unlogged"] == [] and copied["unlogged"] == []  # each has its event
    keys = good_controls["copy_encrypted", "west"]["evidence"]
    assert keys["destination_key_id"] == west.keys.key_id
    (tried,) = keys["regions_tried"]  # the only other region: the source
    assert (tried["region"], tried["key_id"]) == (east.name, east.keys.key_id)
    assert tried["key_id"] != keys["destination_key_id"]
    assert keys["copy"] == copy.id and keys["objects"][0] == "local:west: config"
    assert len(keys["objects"]) >= 2 and keys["objects"][1].startswith("local:west: packs/")
    assert tried["refused"] == len(keys["objects"])
    locked = good_controls["locked", "west"]["evidence"]
    assert locked["object"] == f"points/{copy.id}" and locked["mode"] == "compliance"
    assert bad_controls["locked", "east"]["evidence"]["mode"] == "compliance"
    drilled = good_controls["drilled", "west"]["evidence"]
    assert drilled["point"] == copy.id and drilled["healthy"] is True
    # from west's event log (whole milliseconds), not this host's state store
    assert drilled["source"] == "event log"
    assert drilled["rto_seconds"] == round(drill.seconds_to_healthy * 1000) / 1000
    verified = good_controls["verified", "west"]["evidence"]
    assert verified["event"].startswith("events/") and verified["result"] == "ok"
    assert "no copy of stale-nf in local:west" in bad_controls["copied", "west"]["why"]

    # --region: only that region's controls
    west_only = audit(engine, region="west").to_dict()
    assert {c["region"] for i in west_only["instances"] for c in i["controls"]} == {"local:west"}


def test_a_source_key_that_opens_the_copy_fails_the_encryption_control(
    engine: Engine, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 3, backup="1-7")
    point = engine.backup(inst.id)
    engine.copy(point.id, to="west")
    # a west whose repository key east's KeyService could open (a shared key: what the
    # control exists to catch)
    west_repo = engine.repository("west")
    east_keys = site.region("east").keys
    monkeypatch.setattr(type(east_keys), "unwrap", lambda self, wrapped, context: b"k" * 32)
    found = controls(audit(engine).to_dict(), "nf")
    control = found["copy_encrypted", "west"]
    assert control["status"] == "failed"
    assert "local:east's KeyService opened local:west: config" in control["why"]
    assert west_repo.wrapped_config_key()[1]["vault"] == site.region("west").vault.vault_id


def test_the_event_log_lists_every_step_in_order(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    east = site.region("east")
    inst = add(east, "vcu-1", tmp_path, 4, backup="1-7")
    with acting_for("backup/local:east/vcu-1/slot"):
        first = engine.backup(inst.id)
    clock.advance(minutes=1)
    second = engine.backup(inst.id)
    third = engine.backup(inst.id)
    copy = engine.copy(first.id, to="west").point
    engine.restore(first.id, region="east", target=tmp_path / "restored")
    engine.forget("east", [first.id])
    engine.repository("east").protect(second.id, until=datetime.now(UTC) + timedelta(days=1),
                                      mode=RetentionMode.GOVERNANCE)  # fmt: skip
    with pytest.raises(RetentionLocked):
        engine.forget("east", [second.id])
    clock.advance(days=8)  # past the retention: the retention run forgets, then prunes
    engine.retain("east")
    engine.prune("east")
    engine.verify("east")

    events = engine.repository("east").events()
    steps = [(e.action, e.result, e.point) for e in events]
    assert steps == [
        ("backup", "ok", first.id),
        ("backup", "ok", second.id),
        ("backup", "ok", third.id),
        ("copy", "ok", first.id),
        ("restore", "ok", first.id),
        ("forget", "ok", first.id),
        ("forget", "refused", second.id),
        # the retention run: the locked point stays, the other expired one goes, then prune
        ("forget", "refused", second.id),
        ("forget", "ok", third.id),
        ("prune", "ok", None),
        ("retention", "ok", None),
        ("prune", "ok", None),
        ("verify", "ok", None),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert events[0].who["job"] == "backup/local:east/vcu-1/slot"
    assert events[1].who["job"] is None and "@" in events[1].who["user"]
    assert events[0].instance == inst.id and events[0].detail["bytes"] == first.size
    assert events[3].detail["role"] == "source" and events[3].detail["copy_point"] == copy.id
    assert "RetentionLocked" in (events[6].error or "")
    # the points share their data: the prune frees nothing, and says so
    assert events[9].detail["packs_deleted"] == 0 and events[9].detail["skipped"] == 0
    assert (events[10].detail["forgotten"], events[10].detail["protected"]) == (1, 1)
    assert events[10].detail["forgotten_points"] == [third.id]
    assert events[10].detail["protected_points"] == [second.id]
    assert events[12].detail["problems"] == 0 and events[12].detail["events"] == 12
    # the destination recorded its side of the copy
    (received,) = engine.repository("west").events()
    assert (received.action, received.point, received.detail["source_point"]) == (
        "copy",
        copy.id,
        first.id,
    )
    # nothing of any event is readable at rest: no instance name or id, point id or user
    needles = [inst.id, inst.name, first.id, second.id, third.id, copy.id,
               events[0].who["user"], "backup", "retention"]  # fmt: skip
    for region in (site.region("east"), site.region("west")):
        stored = list((object_path(region, "events")).iterdir())
        assert len(stored) == len(engine.repository(region.name).events())
        for path in stored:
            raw = path.read_bytes()
            assert [n for n in needles if n.encode() in raw] == [], path
    # a failed step is recorded too, with its error; the operation still raises
    with pytest.raises(Exception, match="no recovery point"):
        engine.restore("f" * 32, region="east", target=tmp_path / "nowhere")
    failed = engine.repository("east").events()[-1]
    assert (failed.action, failed.result) == ("restore", "failed")
    assert "no recovery point" in (failed.error or "")


def test_an_event_that_cannot_be_written_never_fails_the_operation(
    engine: Engine, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 5, backup="1-7")
    engine.backup(inst.id)
    real_put = type(east.vault).put

    def put(self: Any, name: str, data: Any, *, if_absent: bool = False) -> Any:
        if name.startswith(fmt.EVENT_PREFIX):
            raise OSError(28, "No space left on device")
        return real_put(self, name, data, if_absent=if_absent)

    monkeypatch.setattr(type(east.vault), "put", put)
    point = engine.backup(inst.id)  # committed, though its event is not
    assert point.id in {p.id for p in engine.points("east")}
    (problem,) = engine.take_hook_problems()
    assert problem.startswith("backup event not recorded in local:east")
    assert "No space left" in problem


def test_audit_command_exit_status_and_event_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cli"
    root.mkdir()
    site_file = root / "site.toml"
    site_file.write_text(site_toml(settings={"state_dir": "state"}, replicate=None))
    monkeypatch.chdir(root)
    with open_site(site_file) as site:
        inst = add(site.region("east"), "solo-nf", tmp_path, 6, backup="1-7")
    ok("backup", inst.id)
    unverified = run("audit", "--json")
    assert unverified.exit_code == 1
    doc = json.loads(unverified.stdout)
    found = statuses(controls(doc, "solo-nf"))
    assert found == {
        ("backed_up", "east"): "passed",
        ("retained", "east"): "passed",
        ("copied", "east"): "not_applicable",
        ("locked", "east"): "not_applicable",
        ("drilled", "east"): "not_applicable",
        ("verified", "east"): "failed",
    }
    assert "1 control(s) failed" in unverified.stderr
    ok("verify")
    assert json.loads(ok("audit", "--json").stdout)["ok"] is True
    ok("audit")  # the table

    listed = json.loads(ok("audit", "--events", "--json").stdout)
    assert [(e["region"], e["action"], e["result"]) for e in listed["events"]] == [
        ("local:east", "backup", "ok"),
        ("local:east", "verify", "ok"),
    ]
    assert listed["events"][0]["subject"]["instance"] == inst.id
    future = run("audit", "--events", "--json", "--since", "2099-01-01")
    assert future.exit_code == 2 and "is in the future" in future.stderr
    bad_since = run("audit", "--since", "yesterday")
    assert bad_since.exit_code == 2 and "--since 'yesterday'" in bad_since.stderr

    # a flipped bit in an event: verify names it, the listing and the audit fail
    with open_site(site_file) as site:
        east = site.region("east")
        name = listed["events"][0]["name"]
        flip_bit(object_path(east, name), 100)
    failed_verify = run("verify")
    assert failed_verify.exit_code == 1 and name in failed_verify.stdout
    assert run("audit", "--events").exit_code == 1
    again = run("audit", "--json")
    assert again.exit_code == 1
    verified = controls(json.loads(again.stdout), "solo-nf")["verified", "east"]
    assert verified["status"] == "failed" and name in json.dumps(verified)


def test_since_takes_a_duration_or_a_time() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_since("2026-12-01T08:00:00+01:00", now) == datetime(2026, 12, 1, 7, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last tuesday", now)


def test_a_tick_records_its_jobs_events_with_their_job_keys(
    site: Site, clock: Clock, tmp_path: Path
) -> None:
    from regionvault.core.pipeline import Service

    engine = Engine(site, clock=clock, settings=SETTINGS, split_copies=True)
    inst = add(site.region("east"), "ticked-nf", tmp_path, 7, backup="1-7")
    report = Service(engine).tick()
    assert report.ok, report.failures()
    backups = [e for e in engine.repository("east").events() if e.action == "backup"]
    (backup,) = backups
    assert backup.instance == inst.id and backup.result == "ok"
    done = {o.key for o in report.jobs if o.kind == "backup"}
    assert backup.who["job"] in done
    west_events = engine.repository("west").events()
    # the tick's retention job in west ran too, and found nothing to forget
    assert sorted(e.action for e in west_events) == ["copy", "retention"]
    (copied,) = [e for e in west_events if e.action == "copy"]
    assert (copied.action, copied.instance, copied.detail["phased"]) == ("copy", inst.id, True)
    assert copied.detail["source_point"] == backup.point
    assert copied.who["job"] in {o.key for o in report.jobs if o.kind == "copy-commit"}


def test_what_cannot_be_read_fails_the_audit_and_is_named(
    engine: Engine, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regionvault.core.errors import ComputeError

    east, west = site.region("east"), site.region("west")
    inst = add(east, "nf", tmp_path, 8, backup="1-7")
    point = engine.backup(inst.id)
    engine.copy(point.id, to="west")
    for region in ("east", "west"):
        engine.verify(region)
    # west's config damaged (a fresh engine: nothing cached), and west's compute down
    flip_bit(object_path(west, "config"), 120)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise ComputeError("compute API unreachable", region=west.name)

    monkeypatch.setattr(west.compute, "list_instances", down)
    fresh = Engine(site, clock=engine.clock, settings=SETTINGS)
    report = audit(fresh)
    assert not report.ok
    assert any("local:west: instances cannot be listed" in p for p in report.problems)
    assert any(p.startswith("local:west cannot be read") for p in report.problems)
    found = controls(report.to_dict(), "nf")
    for key in (("copied", "west"), ("retained", "west"), ("verified", "west")):
        assert found[key]["status"] == "failed", key
        assert "local:west cannot be read" in found[key]["why"], key
    assert found["backed_up", "east"]["status"] == "passed"
    assert found["verified", "east"]["status"] == "passed"
    # east's compute down too: its instance is unknown, not taken for a terminated one
    monkeypatch.setattr(east.compute, "list_instances", down)
    blind = audit(Engine(site, clock=engine.clock, settings=SETTINGS))
    assert blind.instances == [] and not blind.ok


def test_a_destination_that_holds_nothing_yet(engine: Engine, site: Site, tmp_path: Path) -> None:
    inst = add(site.region("east"), "first-nf", tmp_path, 9, backup="1-7",
               **{"backup-lock": "governance-7d"})  # fmt: skip
    engine.backup(inst.id)
    engine.verify("east")
    with pytest.raises(Exception, match="no repository"):
        engine.repository("west", create=False)
    found = controls(audit(engine).to_dict(), "first-nf")
    assert statuses(found) == {
        ("backed_up", "east"): "passed",
        ("retained", "east"): "passed",
        ("retained", "west"): "not_applicable",
        ("copied", "west"): "failed",
        ("copy_encrypted", "west"): "not_applicable",
        ("locked", "east"): "passed",  # the policy's lock is applied at commit
        ("locked", "west"): "not_applicable",
        ("drilled", "east"): "not_applicable",
        ("verified", "east"): "passed",
        ("verified", "west"): "not_applicable",
    }
    assert "no repository in local:west yet" in found["verified", "west"]["why"]
    # the audit wrote nothing: west still holds no repository
    with pytest.raises(Exception, match="no repository"):
        engine.repository("west", create=False)


def test_locks_holds_rotation_and_drills_are_in_the_event_log(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    """The operations other parts of #19 add record their events too: a lock by policy at
    commit and at copy, lock / hold / release from the API the CLI uses, a refused release,
    a key rotation with its key ids, and a scheduled drill in the copy's region."""
    from regionvault.core.errors import RegionVaultError
    from regionvault.core.pipeline import Service

    east = site.region("east")
    tags = {"backup-lock": "governance-1d", "backup-drill": "1d"}
    inst = add(east, "hlr-1", tmp_path, 9, backup="1-7", **tags)
    point = engine.backup(inst.id)
    copy = engine.copy(point.id, to="west").point
    until = datetime.now(UTC) + timedelta(days=3)
    engine.lock_point(point.id, until, RetentionMode.COMPLIANCE)
    with pytest.raises(RegionVaultError):  # shorter than it carries: refused, and recorded
        engine.lock_point(point.id, until - timedelta(days=2), RetentionMode.COMPLIANCE)
    engine.hold_point(point.id)
    engine.release_point(point.id)
    with pytest.raises(RegionVaultError):  # no hold any more: nothing to release
        engine.release_point(point.id)
    rotated = engine.rotate_keys("east")

    east_log = [(e.action, e.result) for e in engine.repository("east").events()]
    assert east_log == [
        ("backup", "ok"),
        ("lock", "ok"),  # by policy, at commit
        ("copy", "ok"),
        ("lock", "ok"),
        ("lock", "refused"),  # a shorter lock: refused by the framework, nothing changed
        ("hold", "ok"),
        ("release", "ok"),
        ("release", "refused"),
        ("rotate-keys", "ok"),
    ]
    events = engine.repository("east").events()
    assert events[1].detail["by"] == "policy" and events[1].point == point.id
    assert events[3].detail["mode"] == "compliance"
    assert (events[8].detail["old_key"], events[8].detail["new_key"]) == (
        rotated.old_key_id,
        rotated.new_key_id,
    )
    west_log = [(e.action, e.result, e.point) for e in engine.repository("west").events()]
    assert west_log[:2] == [("copy", "ok", copy.id), ("lock", "ok", copy.id)]

    # the drill its tag asks, run by a tick: its restore and its drill, in west
    report = Service(engine).tick()
    (drill,) = [o for o in report.jobs if o.kind == "drill"]
    assert drill.status.value == "done", drill.error
    west_events = engine.repository("west").events()
    actions = [e.action for e in west_events]
    # the drill's start (recorded before its launch), its restore, its end
    assert actions[2:] == ["drill", "restore", "drill", "retention"], actions
    started, restored, drilled = west_events[2], west_events[3], west_events[4]
    assert started.detail["phase"] == "start" and started.detail["drill"] == drilled.detail["drill"]
    assert drilled.result == "ok" and drilled.detail["terminated"] is True
    assert drilled.detail["launched"] == restored.detail["launched"]
    assert drilled.point == restored.point == copy.id


def test_a_drill_that_only_began_is_no_drill(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    """A drill's start event (written before its launch) says nothing of how it went: a drill
    killed after it, with no end, must not pass the control."""
    from regionvault.core.repository import EventAction

    east = site.region("east")
    inst = add(east, "amf-1", tmp_path, 12, backup="1-7", **{"backup-drill": "1d"})
    copy = engine.copy(engine.backup(inst.id).id, to="west").point
    engine.record_event(
        "west", EventAction.DRILL, copy, phase="start", drill="0" * 16, slot="x", until=0
    )
    found = controls(audit(engine).to_dict(), "amf-1")
    assert found["drilled", "east"]["status"] == "failed", found["drilled", "east"]
