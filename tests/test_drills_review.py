"""Regressions of the drills/objectives review (issue #19 parts 2-3): the sweep terminates
only drills regionvault recorded launching; the last drill is read from the region's event
log (any machine's status and planner see it, an unhealthy or failed drill is not relaunched
in its slot); drills are due per slot; "newest" is by capture; an opted-out instance is
neither drilled nor judged; a record dated in the future is ignored."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from regionvault.core.errors import VaultError
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.drills import (
    DRILL_RUNNER_TAG,
    DRILL_TAG,
    DRILL_UNTIL_TAG,
    plan_drills,
    run_drill,
    sweep_drill_instances,
)
from regionvault.core.pipeline.objectives import ObjectiveState, rto_state
from regionvault.core.pipeline.state import DrillRecord
from regionvault.core.plugins import hookimpl
from regionvault.core.repository import Event, Repository
from regionvault.core.site import Site
from regionvault.core.types import Instance
from test_drills import (
    Clock,
    Health,
    add,
    clock,
    drill_instances,
    drills,
    engine,
    health,
    jobs,
    launched_state,
    site,
)

__all__ = ["clock", "engine", "health", "jobs", "site"]  # the fixtures taken from there


def test_forged_drill_tags_never_terminate_an_instance(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    # west holds a vault and a real, finished drill on record
    first = Service(engine).tick()
    (drill,) = drills(first)
    assert first.ok and drill.result["healthy"] is True
    real_id = launched_state(west, drill.result["launched"])
    assert real_id == "terminated"
    forged = {
        # an id never recorded, a malformed until, a runner that is surely gone
        "prod-db": {DRILL_TAG: "x", DRILL_UNTIL_TAG: "", DRILL_RUNNER_TAG: "h1p1"},
        "prod-web": {DRILL_TAG: "0123456789abcdef", DRILL_UNTIL_TAG: "1"},
    }
    victims = [add(west, name, tmp_path, backup="1-7", **tags) for name, tags in forged.items()]
    notes, problems = sweep_drill_instances(engine, west.name)
    assert problems == []
    for victim in victims:
        assert launched_state(west, victim.id) == "running"
        assert any(victim.id in n and "no drill of that id is on record" in n for n in notes)
    # nor does a copy of a real, finished drill's id: its end names the instance it launched
    copied = {**forged["prod-web"], DRILL_TAG: _drill_id_of(engine, west.name, nf.id)}
    twin = add(west, "prod-twin", tmp_path, backup="1-7", **copied)
    clock.advance(hours=1)
    report = Service(engine).tick()
    assert report.ok and drills(report) == []
    assert launched_state(west, twin.id) == "running"
    assert all(launched_state(west, v.id) == "running" for v in victims)
    assert any(twin.id in n and "not this instance" in n for n in report.notes)


def _drill_id_of(engine: Engine, region: str, instance_id: str) -> str:
    ended = [
        e
        for e in engine.repository(region, create=False).events()
        if e.action == "drill" and e.instance == instance_id and e.detail.get("phase") != "start"
    ]
    return str(ended[-1].detail["drill"])


def test_a_drill_is_due_once_per_slot_without_drift(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    class Slow:
        @hookimpl
        def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
            clock.advance(minutes=5)  # the restore and the boot take time
            return None

    site.plugin_manager.register(Slow())
    east, west = site.region("east"), site.region("west")
    add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "1h"})
    service = Service(engine)
    t0 = clock()
    assert len(drills(service.tick())) == 1
    clock.now = t0 + timedelta(days=1)  # the next daily tick, exactly one interval later
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.rto_state == "met"  # the last slot's drill keeps it met until this one's
    second = service.tick()
    assert len(drills(second)) == 1, "no drill one interval later"
    clock.advance(minutes=30)
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.rto_state == "met"


def test_rto_goes_stale_only_after_a_whole_slot_without_a_drill() -> None:
    day = timedelta(days=1)
    noon = datetime(2026, 12, 7, 12, tzinfo=UTC)

    def at(moment: datetime) -> DrillRecord:
        return DrillRecord("local:west", "i-1", "p", "i-2", moment, True, 5.0)

    minute = timedelta(minutes=1)
    # drilled yesterday at 23:59: met today, whatever the hour
    late = at(datetime(2026, 12, 6, 23, 59, tzinfo=UTC))
    assert rto_state(minute, late, interval=day, now=noon) is ObjectiveState.MET
    # drilled the day before yesterday: a whole slot passed without one
    early = at(datetime(2026, 12, 5, 23, 59, tzinfo=UTC))
    assert rto_state(minute, early, interval=day, now=noon) is ObjectiveState.AT_RISK
    # dated in the future (a clock ahead): no drill, at risk
    ahead = at(noon + timedelta(hours=2))
    assert rto_state(minute, ahead, interval=day, now=noon) is ObjectiveState.AT_RISK


def test_an_opted_out_instance_is_neither_judged_nor_drilled(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(
        east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d", "backup-rpo": "26h"}
    )
    service = Service(engine)
    assert service.tick().ok and len(health.launches) == 1
    east.compute.set_tags(nf.id, {"backup": "none"})  # the operator opts it out
    clock.advance(days=3)
    report = service.tick()
    assert report.ok and drills(report) == [] and len(health.launches) == 1
    rows = {r.region: r for r in engine.status()}
    assert rows[east.name].rpo_state is None and rows[west.name].rpo_state is None
    assert not any(r.breached for r in rows.values())
    # opted in again: judged again
    east.compute.set_tags(nf.id, {"backup": "1-7"})
    rows = {r.region: r for r in engine.status()}
    assert rows[east.name].rpo_state == "breached"


def test_another_machine_sees_the_drill_and_does_not_relaunch_it(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    west = site.region("west")
    add(
        site.region("east"),
        "vcu-1",
        tmp_path,
        **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "1h"},
    )
    health.west = False
    service = Service(engine)
    (first,) = drills(service.tick())
    assert first.error is not None and "did not become healthy" in first.error
    # this machine's cache names the slot: its own next plan needs no read of the log
    cached = engine.state.last_drill(west.name, first.key.split("/")[2])
    assert cached is not None and cached.slot == first.key.split("/")[-1] and not cached.healthy
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Repository, "events", _unreadable)
        plan = plan_drills(engine, west.name, clock())
    assert plan.jobs == [] and plan.problems == []
    # another worker machine of the region: no local drill record, no job ledger (as when a
    # drill interval outlives the ledger's retention of its done record)
    shutil.rmtree(engine.state.root / "drills")
    shutil.rmtree(engine.state.root / "jobs", ignore_errors=True)
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.last_drill_healthy is False and row.rto_state == "breached"
    clock.advance(hours=1)
    again = service.tick()
    assert drills(again) == [] and len(health.launches) == 1
    # the next slot drills again
    health.west = None
    clock.advance(days=1)
    (third,) = drills(service.tick())
    assert third.result["healthy"] is True and len(health.launches) == 2
    shutil.rmtree(engine.state.root / "drills")
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.last_drill_healthy is True and row.rto_state == "met"


def _unreadable(*args: object, **kwargs: object) -> list[Event]:
    raise VaultError("the event log is not read when the cache answers")


def test_the_drill_and_the_rpo_take_the_newest_data_not_the_last_copy(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    old = engine.backup(nf.id)
    time.sleep(0.05)
    new = engine.backup(nf.id)
    engine.copy(new.id, to="west")
    time.sleep(0.05)
    engine.copy(old.id, to="west")  # a backlog copied late, or an operator's copy of an old point
    (job,) = plan_drills(engine, west.name, clock()).jobs
    result = run_drill(engine, job)
    source = {
        p.id: p.lineage.source_recovery_point for p in engine.points(west.name, nf.id) if p.lineage
    }
    assert source[result["point"]] == new.id
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert source[row.newest_point or ""] == new.id
    (home,) = [r for r in engine.status() if r.region == east.name]
    assert row.rpo_seconds is not None and home.rpo_seconds is not None
    assert abs(row.rpo_seconds - home.rpo_seconds) < 0.01  # the same capture's age


def test_a_drill_record_dated_in_the_future_is_ignored(
    engine: Engine,
    site: Site,
    clock: Clock,
    health: Health,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    west = site.region("west")
    add(
        site.region("east"),
        "vcu-1",
        tmp_path,
        **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "1h"},
    )
    service = Service(engine)
    t0 = clock()
    clock.advance(days=2)  # this machine's clock runs two days ahead
    assert len(drills(service.tick())) == 1
    clock.now = t0  # set right again
    with caplog.at_level(logging.WARNING):
        (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.last_drill_at is None and row.rto_state == "at_risk"
    assert "in the future" in caplog.text
    assert len(drills(service.tick())) == 1  # drilled in its own slot all the same


def test_a_hung_health_check_is_bounded_and_its_instance_terminated(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    release = threading.Event()

    class Hung:
        @hookimpl
        def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
            if region == "local:west":
                release.wait(30)  # hangs past the engine's 0.5s health timeout
            return None

    site.plugin_manager.register(Hung())
    west = site.region("west")
    add(site.region("east"), "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    try:
        (drill,) = drills(Service(engine).tick())
    finally:
        release.set()
    assert drill.error is not None and "did not answer within 0.5s" in drill.error
    ((_, launched, rto),) = health.launches
    assert rto is None and launched_state(west, launched) == "terminated"
    assert drill_instances(west) == []
