"""Regression tests for the event-log/audit review (issue #19): each was a way to make a
control pass wrongly, or to lose evidence, on the code before the fix (docs/audit.md)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cli_support import ok, run
from regionvault.core import Site
from regionvault.core.errors import KeyAccessDenied, RetentionLocked
from regionvault.core.pipeline import Engine
from regionvault.core.pipeline.audit import VERIFY_MAX_AGE, audit, parse_since
from regionvault.core.repository._events import forget_tail
from repository_support import flip_bit, object_path
from site_support import open_site, site_toml
from test_audit import SETTINGS, Clock, add, controls

THREE_REGIONS = {"local:east": "east", "local:west": "west", "local:north": "north"}


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


def fresh(site: Site, clock: Any) -> Engine:
    """Another process (another host): no cached log tail, no state store of its own."""
    for region in site.regions:
        forget_tail(region.vault.vault_id)
    return Engine(site, clock=clock, settings=SETTINGS)


def test_a_deleted_event_is_refused_or_fails_verified(
    engine: Engine, site: Site, tmp_path: Path
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 1, backup="1-7")
    engine.backup(inst.id)
    engine.verify("east")
    engine.record_event("east", "verify", None, "3 problem(s), the first: packs/ab/..")
    failing = engine.repository("east").events()
    assert controls(audit(engine).to_dict(), "nf")["verified", "east"]["status"] == "failed"
    # the vault has WORM: an ordinary delete of the failed verify's event is refused
    with pytest.raises(RetentionLocked):
        east.vault.delete(failing[-1].name)
    # one who may bypass it deletes an event inside the log (the old code: unnoticed)
    object_path(east, failing[1].name).unlink()
    assert not engine.verify("east").ok
    found = controls(audit(fresh(site, engine.clock)).to_dict(), "nf")["verified", "east"]
    assert found["status"] == "failed"
    assert "event 1 of the log missing" in found["why"] + json.dumps(found["evidence"])


def test_a_merely_denied_auditor_cannot_pass_copy_encrypted(
    engine: Engine, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east, west = site.region("east"), site.region("west")
    inst = add(east, "nf", tmp_path, 2, backup="1-7")
    engine.copy(engine.backup(inst.id).id, to="west")
    assert controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]["status"] == "passed"

    # the auditing role lacks kms:Decrypt on east's key: every unwrap by east is denied,
    # its own config key too: a refusal proves nothing (the old code: passed)
    def denied(wrapped: bytes, context: Any) -> bytes:
        raise KeyAccessDenied("AccessDeniedException: not authorized to perform kms:Decrypt")

    monkeypatch.setattr(east.keys, "unwrap", denied)
    found = controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]
    assert found["status"] == "failed"
    assert found["why"].startswith("cannot prove: local:east's KeyService does not open its own")
    monkeypatch.undo()

    # west's own KeyService cannot open its config: no proof either
    monkeypatch.setattr(west.keys, "unwrap", denied)
    found = controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]
    assert found["status"] == "failed"
    assert found["why"].startswith("cannot prove: local:west's own KeyService does not open")
    monkeypatch.undo()

    # an error that is neither an open nor a refusal: could not tell
    real = east.keys.unwrap

    def broken(wrapped: bytes, context: Any) -> bytes:
        if context.get("vault") == west.vault.vault_id:
            raise RetentionLocked("x", "a provider error of another kind")
        return real(wrapped, context)

    monkeypatch.setattr(east.keys, "unwrap", broken)
    found = controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]
    assert found["status"] == "failed" and found["why"].startswith("could not tell")


def test_pack_run_keys_under_the_source_key_fail_copy_encrypted(
    engine: Engine, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east, west = site.region("east"), site.region("west")
    inst = add(east, "nf", tmp_path, 3, backup="1-7")
    engine.copy(engine.backup(inst.id).id, to="west")  # west's config under west's key
    # later west's key setting names east's key (an alias moved): new run keys come from
    # east's key, while west's config stays under west's (the old code: passed)
    west_unwrap = west.keys.unwrap

    def unwrap(wrapped: bytes, context: Any) -> bytes:
        try:
            return west_unwrap(wrapped, context)
        except KeyAccessDenied:
            return east.keys.unwrap(wrapped, context)

    monkeypatch.setattr(west.keys, "generate_data_key", east.keys.generate_data_key)
    monkeypatch.setattr(west.keys, "unwrap", unwrap)
    (tmp_path / "data" / "nf" / "new.bin").write_bytes(random.Random(9).randbytes(200_000))
    engine.copy(engine.backup(inst.id).id, to="west")
    found = controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]
    assert found["status"] == "failed"
    assert found["why"].startswith("local:east's KeyService opened local:west: packs/")


def test_every_other_region_s_key_service_is_offered_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml(THREE_REGIONS, settings={"state_dir": "state"}))
    with open_site(path) as site:
        east, west, north = (site.region(n) for n in ("east", "west", "north"))
        engine = Engine(site, settings=SETTINGS)
        # west's data is under north's key (west set up with north's key): east refuses,
        # north opens it (the old code tried only the source, east: passed)
        for method in ("generate_data_key", "unwrap"):
            monkeypatch.setattr(west.keys, method, getattr(north.keys, method))
        inst = add(east, "nf", tmp_path, 4, backup="1-7")
        engine.copy(engine.backup(inst.id).id, to="west")
        found = controls(audit(engine).to_dict(), "nf")["copy_encrypted", "west"]
        assert found["status"] == "failed"
        assert found["why"].startswith("local:north's KeyService opened local:west: config")
        tried = found["evidence"]["regions_tried"]
        assert [t["region"] for t in tried] == ["local:east", "local:north"]
        assert tried[0]["refused"] == len(found["evidence"]["objects"])


def test_order_is_the_sequence_not_the_writers_clocks(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    inst = add(site.region("east"), "nf", tmp_path, 7, backup="1-7")
    engine.backup(inst.id)
    # host A's clock is 2 h fast: a clean verify; host B, right, later: a failed one
    fast = fresh(site, lambda: clock.now + timedelta(hours=2))
    fast.verify("east")
    slow = fresh(site, lambda: clock.now + timedelta(minutes=1))
    slow.record_event("east", "verify", None, "5 problem(s), the first: packs/..")
    later = fresh(site, lambda: clock.now + timedelta(minutes=2))
    found = controls(audit(later).to_dict(), "nf")["verified", "east"]
    assert found["status"] == "failed" and "5 problem(s)" in found["why"]  # old: passed
    # one wrong reading does not spread: each event keeps its writer's time as data
    events = later.repository("east").events()
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].at < events[-2].at


def test_a_drill_in_the_event_log_survives_the_host(
    engine: Engine, site: Site, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    inst = add(east, "nf", tmp_path, 8, backup="1-7", **{"backup-drill": "7d"})
    copy = engine.copy(engine.backup(inst.id).id, to="west").point
    drill = engine.restore(copy.id, region="west", launch=True)
    assert drill.instance is not None
    west.compute.terminate(drill.instance.id)
    shutil.rmtree(Path(site.config.state_dir))  # a new host: the state store is gone
    found = controls(audit(fresh(site, engine.clock)).to_dict(), "nf")["drilled", "west"]
    assert found["status"] == "passed"  # old: failed, "no drill recorded"
    assert found["evidence"]["source"] == "event log"
    assert found["evidence"]["point"] == copy.id


def test_audit_events_fails_when_a_region_log_cannot_be_read(
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
    ok("audit", "--events")  # west holds no repository yet: not a failure
    # --since: the real reason, a future time refused, an unknown region a usage error
    for args, says in (
        (["--since", "0"], "must be greater than zero"),
        (["--since", "99999999d"], "longer than 100 years"),
        (["--since", "2999-01-01"], "is in the future"),
        (["--region", "nosuch"], "nosuch"),
        (["--events", "--region", "nosuch"], "nosuch"),
    ):
        result = run("audit", *args)
        assert result.exit_code == 2 and says in result.stderr, (args, result.stderr)
    assert "neither a duration" not in run("audit", "--since", "0").stderr
    with open_site(site_file) as site:
        flip_bit(object_path(site.region("east"), "config"), 120)
    result = run("audit", "--events", "--json")
    assert result.exit_code == 1  # old: 0
    assert "local:east" in json.loads(result.stdout)["unreadable"]


def test_since_says_why_it_is_refused() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 7, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="'0': a duration must be greater than zero"):
        parse_since("0", now)
    with pytest.raises(ValueError, match="in the future"):
        parse_since("2026-12-08", now)
    assert parse_since("2026-12-07T12:00:00+00:00", now) == now


def test_the_audit_reads_the_window_its_controls_need(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 9, backup="1-7")
    engine.repository("east")  # created
    month_ago = Engine(site, clock=lambda: clock.now - timedelta(days=30), settings=SETTINGS)
    for _ in range(60):  # an old, busy log
        month_ago.record_event("east", "prune", None, packs_deleted=0)
    engine.backup(inst.id)
    engine.verify("east")
    report = audit(engine).to_dict()
    reads = report["event_reads"]["local:east"]
    assert reads["events_in_log"] == 62
    # the window: 7 days' retention, a day's frequency and a tick back; the 60 old events
    # cost a bisection (at most 7 fetches), not a read each
    assert reads["from_seq"] == 60 and reads["events_fetched"] <= 7 + 2 + 1
    found = controls(report, "nf")
    assert found["verified", "east"]["status"] == "passed"
    assert found["backed_up", "east"]["status"] == "passed", found["backed_up", "east"]


def test_a_stale_verify_fails_and_an_unlogged_point_is_named(
    engine: Engine, clock: Clock, site: Site, tmp_path: Path
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 10, backup="1-7")
    engine.verify("east") if engine.backup(inst.id) else None
    # a backup committed whose event was lost (a crash between the two): written by the
    # repository alone, as the engine's commit does before it records
    engine.record_event("east", "prune", None)  # the log began before the point
    unlogged = engine.repository("east").backup(
        east.compute.capture(inst.id), instance=east.compute.get_instance(inst.id)
    )
    found = controls(audit(engine).to_dict(), "nf")
    assert unlogged.id in found["backed_up", "east"]["evidence"]["unlogged"]
    clock.advance(days=1)
    engine.backup(inst.id)
    clock.advance(seconds=VERIFY_MAX_AGE.total_seconds() - 86400 + 60)
    engine.backup(inst.id)
    found = controls(audit(engine).to_dict(), "nf")
    assert found["verified", "east"]["status"] == "failed"  # old: passed, a year on too
    assert "beyond 604800s" in found["verified", "east"]["why"]


def test_a_terminated_instance_is_audited_while_its_points_remain(
    engine: Engine, site: Site, tmp_path: Path
) -> None:
    east = site.region("east")
    inst = add(east, "nf", tmp_path, 11, backup="1-7")
    engine.backup(inst.id)
    engine.verify("east")
    east.compute.terminate(inst.id)
    found = controls(audit(engine).to_dict(), "nf")  # old: left out of the report
    assert found["backed_up", "east"]["status"] == "not_applicable"
    assert found["retained", "east"]["status"] == "passed"
    assert found["verified", "east"]["status"] == "passed"
