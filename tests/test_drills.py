"""Scheduled drills (core/pipeline/drills.py) and RPO/RTO objectives in status
(core/pipeline/objectives.py): drills planned by tag in a tick with an injected clock,
launched, health-checked, timed and terminated whatever happened; a drill killed between
launch and terminate cleaned up by the next tick; objectives met, at risk and breached in
``status --json``, the table and the exit status."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from cli_support import ok, run
from clock_support import clear_of_day_end
from regionvault.core.errors import ComputeError
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline.drills import (
    DRILL_RUNNER_TAG,
    DRILL_TAG,
    DRILL_UNTIL_TAG,
    drill_jobs,
    no_copy_notes,
    sweep_drill_instances,
)
from regionvault.core.pipeline.jobs import DRILL, JobOutcome, JobStatus, backup_job, slot_of
from regionvault.core.pipeline.objectives import ObjectiveState, rpo_state, rto_state
from regionvault.core.pipeline.reports import TickReport
from regionvault.core.pipeline.scheduler import due_instances
from regionvault.core.pipeline.state import DrillRecord
from regionvault.core.plugins import hookimpl
from regionvault.core.repository import RepositorySettings
from regionvault.core.repository._format import PACK_PREFIX
from regionvault.core.site import Region, Site
from regionvault.core.types import Instance, RecoveryPoint
from site_support import open_site, site_toml

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)
TESTS = Path(__file__).parent


class Clock:
    """An injected clock: the engine sees ``now``, which the test moves."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class Health:
    """A plugin: the health check's answer for instances launched in local:west (None: the
    default rule, a running instance is healthy), and every launch the engine reports."""

    def __init__(self) -> None:
        self.west: bool | None = None
        self.launches: list[tuple[str, str, float | None]] = []

    @hookimpl
    def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
        return self.west if region == "local:west" else None

    @hookimpl
    def regionvault_after_launch(
        self,
        region: str,
        instance: Instance,
        recovery_point: RecoveryPoint,
        seconds_to_healthy: float | None,
    ) -> None:
        self.launches.append((region, instance.id, seconds_to_healthy))


class Jobs:
    """A plugin: every job outcome the service reports (what the metrics plugin counts)."""

    def __init__(self) -> None:
        self.outcomes: list[JobOutcome] = []

    @hookimpl
    def regionvault_after_job(self, outcome: JobOutcome) -> None:
        self.outcomes.append(outcome)


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


@pytest.fixture
def site(tmp_path: Path, health: Health, jobs: Jobs) -> Iterator[Site]:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml(settings={"default_policy": "1-7", "state_dir": "state"}))
    with open_site(path, health, jobs) as s:
        yield s


def start_of_clock() -> datetime:
    """Near the real time (points record real creation times), early enough in its UTC day
    that a few hours later is the same daily slot."""
    now = datetime.now(UTC)
    return min(now, slot_of(now, timedelta(days=1)) + timedelta(hours=18))


@pytest.fixture
def clock() -> Clock:
    return Clock(start_of_clock())


@pytest.fixture
def engine(site: Site, clock: Clock) -> Engine:
    return Engine(site, clock=clock, settings=SETTINGS, health_timeout=0.5)


def add(region: Region, name: str, tmp_path: Path, **tags: str) -> Instance:
    data = tmp_path / "data" / name
    data.mkdir(parents=True)
    rng = random.Random(name)
    (data / "db.bin").write_bytes(rng.randbytes(32 << 10))
    return region.compute.register_instance(name, data, function="sleep 300", tags=tags)


def drills(report: TickReport) -> list[JobOutcome]:
    return [o for o in report.jobs if o.kind == DRILL]


def drill_instances(region: Region) -> list[Instance]:
    """The live instances of ``region`` a drill launched."""
    return list(region.compute.list_instances(tag_filters={DRILL_TAG: None}))


def launched_state(region: Region, instance_id: str) -> str:
    return region.compute.get_instance(instance_id).state


# --------------------------------------------------------------------------- scheduled


def test_a_drill_by_tag_runs_terminates_and_waits_its_interval(
    engine: Engine, site: Site, clock: Clock, health: Health, jobs: Jobs, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "5m"})
    service = Service(engine)

    first = service.tick()
    assert first.ok, (first.problems, [o.error for o in first.failures()])
    (drill,) = drills(first)
    assert drill.status is JobStatus.DONE and drill.region == west.name
    assert drill.key.startswith(f"drill/{west.name}/{nf.id}/")
    (copy,) = [p for p in engine.points(west.name, nf.id) if p.lineage is not None]
    assert drill.result["point"] == copy.id and drill.result["healthy"] is True
    launched = drill.result["launched"]
    # launched from the copy, health-checked, timed, reported, and gone again
    assert launched_state(west, launched) == "terminated"
    assert drill_instances(west) == []
    assert [(r, i) for r, i, _ in health.launches] == [(west.name, launched)]
    rto = health.launches[0][2]
    assert rto is not None and drill.result["rto_seconds"] == rto
    assert [o.key for o in jobs.outcomes if o.kind == DRILL] == [drill.key]
    record = engine.state.last_drill(west.name, nf.id)
    assert record is not None and record.healthy and record.launched_id == launched
    assert record.at == clock() and record.point_id == copy.id

    (row,) = [r for r in engine.status() if r.region == west.name]
    # the event log records the RTO to the millisecond
    assert row.last_drill_rto == pytest.approx(rto, abs=0.001) and row.last_drill_healthy is True
    assert row.rto_objective_seconds == 300 and row.rto_state == "met"
    assert row.drill_interval_seconds == 86400
    # east holds no drill of it: drills run in destinations, so no RTO state there
    (home,) = [r for r in engine.status() if r.region == east.name]
    assert home.last_drill_at is None and home.rto_state is None
    assert home.rto_objective_seconds == 300

    # before the interval: no drill
    clock.advance(hours=5)
    second = service.tick()
    assert second.ok and drills(second) == []
    assert len(health.launches) == 1

    # once the interval has passed: another one, from the newest copy
    clock.advance(days=1)
    third = service.tick()
    assert third.ok, (third.problems, [o.error for o in third.failures()])
    (again,) = drills(third)
    assert again.status is JobStatus.DONE and again.key != drill.key
    newest_copy = [p for p in engine.points(west.name, nf.id) if p.lineage is not None][-1]
    assert again.result["point"] == newest_copy.id != copy.id
    assert launched_state(west, again.result["launched"]) == "terminated"
    assert drill_instances(west) == [] and len(health.launches) == 2
    newer = engine.state.last_drill(west.name, nf.id)
    assert newer is not None and newer.at == clock()


def test_run_drills_on_its_ticks_as_the_injected_clock_moves(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    add(site.region("east"), "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    reports: list[TickReport] = []

    def on_tick(report: TickReport) -> None:
        reports.append(report)
        clock.advance(hours=13)

    stop = threading.Event()
    ran = Service(engine).run(
        stop, interval=timedelta(milliseconds=1), on_tick=on_tick, max_ticks=4
    )
    assert ran == 4 and all(r.ok for r in reports)
    # a drill per day slot (slot_of(now, 1d)): a tick drills when its day is not the previous
    # tick's. Which ticks those are depends on the hour the clock starts at (from 18:00: at
    # 0h (day 1) a drill, at 13h (07:00, day 2) one, at 26h (20:00, day 2) none, at 39h
    # (09:00, day 3) one; from 05:00: 1, 0, 1, 0), and every start has a tick in the
    # previous tick's day
    days = [slot_of(r.at, timedelta(days=1)) for r in reports]
    expected = [1] + [int(day != before) for before, day in pairwise(days)]
    assert 0 in expected and expected.count(1) >= 2
    assert [len(drills(r)) for r in reports] == expected
    assert len(health.launches) == sum(expected) and drill_instances(site.region("west")) == []


def test_the_launched_drill_is_marked_and_opted_out_of_backups(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    tags = {"backup": "1-7", "backup-drill": "1d", "backup-rpo": "26h", "team": "ran"}
    nf = add(east, "vcu-1", tmp_path, **tags)
    Service(engine).tick()
    (_, launched, _), *_ = health.launches
    seen = west.compute.get_instance(launched)
    assert seen.tags["backup"] == "none" and seen.tags["team"] == "ran"
    assert "backup-drill" not in seen.tags and "backup-rpo" not in seen.tags
    assert len(seen.tags[DRILL_TAG]) == 16 and seen.tags[DRILL_UNTIL_TAG].isdigit()
    assert seen.tags[DRILL_RUNNER_TAG].startswith("h")
    assert seen.name.startswith(f"{nf.name}-")


def test_an_instance_without_a_copy_drills_nothing_and_says_so(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    west = site.region("west")
    # west replicates nowhere: its instance has a drill interval and no copy anywhere
    nf = add(west, "vdu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    report = Service(engine).tick()
    assert report.ok and report.outcome == "ok"
    assert drills(report) == [] and health.launches == []
    assert [n for n in report.notes if nf.id in n] == [
        f"{nf.id} ({nf.name}): drill every 1d, but its policy copies nowhere"
    ]
    assert "notes" in report.to_dict() and report.to_dict()["notes"] == report.notes


def test_a_malformed_drill_tag_is_said_not_drilled(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    nf = add(site.region("east"), "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "30m"})
    report = Service(engine).tick()
    assert report.ok and drills(report) == [] and health.launches == []
    (note,) = [n for n in report.notes if "not drilled" in n]
    assert note.startswith("local:west: not drilled: ")
    assert f"instance {nf.id} (vcu-1): tag backup-drill='30m'" in note
    assert "shorter than 1h" in note


def test_an_unhealthy_drill_still_terminates_and_breaches_the_rto(
    engine: Engine, site: Site, clock: Clock, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "1h"})
    health.west = False
    service = Service(engine)
    report = service.tick()
    (drill,) = drills(report)
    assert drill.status is JobStatus.FAILED
    assert drill.error is not None and "did not become healthy" in drill.error
    assert "terminated" in drill.error
    ((region, launched, rto),) = health.launches
    assert region == west.name and rto is None
    assert launched_state(west, launched) == "terminated" and drill_instances(west) == []
    record = engine.state.last_drill(west.name, nf.id)
    assert record is not None and not record.healthy and record.rto_seconds is None
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.last_drill_healthy is False and row.rto_state == "breached" and row.breached

    # the drill did run: the next tick does not launch again before the interval
    clock.advance(hours=1)
    assert drills(service.tick()) == [] and len(health.launches) == 1


def test_a_drill_that_cannot_launch_is_a_failed_job_and_leaves_nothing(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    service = Service(engine)
    # a copy first, then its data made unreadable in west: the restore cannot launch it
    engine.copy(engine.backup(nf.id).id, to="west")
    vault = west.vault
    packs = [o.name for o in vault.list(PACK_PREFIX)]
    assert packs
    for name in packs:
        vault.put(name, b"\0" * 64)
    report = service.tick()
    failed = [o for o in drills(report) if o.status is JobStatus.FAILED]
    assert failed and failed[0].error is not None
    assert "cannot launch copy" in failed[0].error
    assert health.launches == [] and drill_instances(west) == []
    # on record: a drill of the slot that launched nothing, the RTO breached
    record = engine.state.last_drill(west.name, nf.id)
    assert record is not None and not record.healthy and record.launched_id == ""
    (row,) = [r for r in engine.status() if r.region == west.name]
    assert row.last_drill_healthy is False and row.rto_state is None  # no RTO objective
    # backed off: the copy is not restored again in the same slot
    assert drills(service.tick()) == []


def test_a_drill_whose_terminate_failed_is_terminated_by_the_next_tick(
    engine: Engine,
    site: Site,
    clock: Clock,
    health: Health,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    east, west = site.region("east"), site.region("west")
    add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d", "backup-rto": "5m"})
    terminate = west.compute.terminate

    def refuse(instance_id: str) -> None:
        raise ComputeError("the compute API is down")

    monkeypatch.setattr(west.compute, "terminate", refuse)
    service = Service(engine)
    first = service.tick()
    (drill,) = drills(first)
    assert drill.status is JobStatus.FAILED and drill.error is not None
    assert "could not be terminated (the compute API is down)" in drill.error
    (left,) = drill_instances(west)
    # its RTO is on record all the same
    (row,) = [r for r in engine.status() if r.region == west.name and r.role == "copy"]
    assert row.last_drill_healthy is True and row.rto_state == "met"

    # the same process ticks again: its drill is over, so the instance is left behind
    monkeypatch.setattr(west.compute, "terminate", terminate)
    clock.advance(hours=1)
    second = service.tick()
    assert second.ok and drills(second) == []
    assert launched_state(west, left.id) == "terminated" and drill_instances(west) == []
    assert any(left.id in n and "its drill is over" in n for n in second.notes)


def test_a_running_drill_is_not_taken_for_a_leftover(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    swept: list[tuple[list[str], list[str]]] = []

    class SweepWhileChecking:
        @hookimpl
        def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
            if region == west.name and not swept:
                swept.append(sweep_drill_instances(engine, west.name))
            return None

    site.plugin_manager.register(SweepWhileChecking())
    report = Service(engine).tick()
    assert report.ok
    # another sweep in the middle of the drill (a concurrent tick) left its instance alone
    assert swept == [([], [])]
    (drill,) = drills(report)
    assert drill.status is JobStatus.DONE and drill.result["healthy"] is True
    assert launched_state(west, drill.result["launched"]) == "terminated"


def test_no_copy_yet_is_said_for_each_destination(
    engine: Engine, site: Site, clock: Clock, tmp_path: Path
) -> None:
    east = site.region("east")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1w"})
    engine.backup(nf.id)  # backed up, not copied yet
    report = TickReport(at=clock())
    report.schedule.append(due_instances(east.compute, lambda i: None, site.config, clock()))
    assert no_copy_notes(engine, report, engine.points_view()) == [
        f"{nf.id} (vcu-1): drill every 1w: no copy in local:west yet, nothing to drill"
    ]
    assert drill_jobs(engine, report, ["local:west"], clock()) == []


# --------------------------------------------------------------------------- killed


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from regionvault.core.pipeline import Engine, Service
    from regionvault.core.plugins import hookimpl
    from site_support import open_site

    class Killer:
        @hookimpl
        def regionvault_health_check(self, region, instance):
            if region == "local:west":
                os.kill(os.getpid(), signal.SIGKILL)  # launched, not yet terminated
            return None

    with open_site(Path(sys.argv[1]), Killer()) as site:
        Service(Engine(site)).tick()
    """
)


def test_a_drill_killed_after_launch_is_terminated_by_the_next_tick(
    engine: Engine, site: Site, health: Health, tmp_path: Path
) -> None:
    east, west = site.region("east"), site.region("west")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-drill": "1d"})
    engine.copy(engine.backup(nf.id).id, to="west")
    assert site.config.source is not None
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, site.config.source, str(TESTS)],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()
    (left,) = drill_instances(west)
    assert left.state == "running" and left.tags["backup"] == "none"

    report = Service(engine).tick()
    assert report.ok, (report.problems, [o.error for o in report.failures()])
    assert launched_state(west, left.id) == "terminated"
    assert any(left.id in n and "process is gone" in n for n in report.notes), report.notes
    # and the drill itself ran in this tick, and terminated its own instance
    (drill,) = drills(report)
    assert drill.status is JobStatus.DONE and drill.result["launched"] != left.id
    assert drill_instances(west) == []


# --------------------------------------------------------------------------- objectives


def test_rpo_rules() -> None:
    day, hour = timedelta(days=1), timedelta(hours=1)
    assert rpo_state(None, age=day * 9, age_at_next_backup=None, last_backup_failed=True) is None
    breached = rpo_state(
        26 * hour, age=27 * hour, age_at_next_backup=27 * hour, last_backup_failed=False
    )
    assert breached is ObjectiveState.BREACHED
    late = rpo_state(20 * hour, age=hour, age_at_next_backup=day, last_backup_failed=False)
    assert late is ObjectiveState.AT_RISK
    failed = rpo_state(26 * hour, age=hour, age_at_next_backup=day, last_backup_failed=True)
    assert failed is ObjectiveState.AT_RISK
    met = rpo_state(26 * hour, age=20 * hour, age_at_next_backup=day, last_backup_failed=False)
    assert met is ObjectiveState.MET


def test_rto_rules() -> None:
    now = datetime(2026, 12, 7, 12, tzinfo=UTC)

    def drill(age: timedelta, rto: float | None) -> DrillRecord:
        return DrillRecord("local:west", "i-1", "p", "i-2", now - age, rto is not None, rto)

    hour, minute = timedelta(hours=1), timedelta(minutes=1)
    assert rto_state(None, None, interval=None, now=now) is None
    assert rto_state(minute, None, interval=None, now=now) is ObjectiveState.AT_RISK
    assert rto_state(minute, drill(hour, None), interval=None, now=now) is ObjectiveState.BREACHED
    assert rto_state(minute, drill(hour, 61.0), interval=None, now=now) is ObjectiveState.BREACHED
    assert rto_state(minute, drill(hour, 60.0), interval=None, now=now) is ObjectiveState.MET
    week = timedelta(days=7)
    assert rto_state(minute, drill(week * 2, 5.0), interval=week, now=now) is ObjectiveState.AT_RISK
    assert rto_state(minute, drill(week, 5.0), interval=week, now=now) is ObjectiveState.MET
    # with no drill interval, a drill older than 30 days
    old = drill(timedelta(days=31), 5.0)
    assert rto_state(minute, old, interval=None, now=now) is ObjectiveState.AT_RISK


def test_a_failed_last_backup_puts_the_rpo_at_risk(
    engine: Engine, site: Site, clock: Clock, tmp_path: Path
) -> None:
    east = site.region("east")
    nf = add(east, "vcu-1", tmp_path, **{"backup": "1-7", "backup-rpo": "26h"})
    report = Service(engine).tick()
    assert report.ok
    (row,) = [r for r in engine.status() if r.region == east.name]
    assert row.rpo_state == "met" and not row.last_backup_failed
    # the next day's backup job fails (its key, as the scheduler makes it)
    clock.advance(days=1)
    key = backup_job(east.name, nf.id, slot_of(clock(), timedelta(days=1))).key
    engine.ledger().mark_failed(
        JobOutcome(key, "backup", east.name, JobStatus.FAILED, error="capture failed")
    )
    (row,) = [r for r in engine.status() if r.region == east.name]
    assert row.last_backup_failed and row.rpo_state == "at_risk"
    # once the data is older than 26h (measured from its capture, a real time)
    assert row.rpo_seconds is not None and row.rpo_seconds <= 26 * 3600
    clock.advance(seconds=26 * 3600 - row.rpo_seconds + 60)
    (row,) = [r for r in engine.status() if r.region == east.name]
    assert row.rpo_state == "breached" and row.breached


# --------------------------------------------------------------------------- CLI


def add_cli(name: str, data: Path, *tags: str) -> str:
    data.mkdir(parents=True)
    (data / "state.db").write_bytes(name.encode() * 100)
    args = [a for tag in tags for a in ("--tag", tag)]
    return ok("instances", "add", "-r", "east", "-n", name, "--data", data, *args).stdout.split()[
        -1
    ]


def test_cli_tick_drills_and_status_shows_the_rto(workdir: Path) -> None:
    clear_of_day_end()  # the second tick must find the first one's daily slot drilled
    nf = add_cli("vcu", workdir / "vcu", "backup=1-7", "backup-drill=1d", "backup-rto=10m")
    report = json.loads(ok("tick", "--json").stdout)
    (drill,) = [j for j in report["jobs"] if j["kind"] == "drill"]
    assert drill["outcome"] == "ok" and drill["region"] == "local:west"
    assert drill["result"]["terminated"] is True
    rows = json.loads(ok("status", "--json").stdout)
    (west,) = [r for r in rows if r["region"] == "local:west"]
    assert west["instance_id"] == nf
    assert west["last_drill_rto"] == pytest.approx(drill["result"]["rto_seconds"], abs=0.001)
    assert west["rto_state"] == "met" and west["rto_objective_seconds"] == 600
    # the next tick, at once: nothing to drill
    again = json.loads(ok("tick", "--json").stdout)
    assert [j for j in again["jobs"] if j["kind"] == "drill" and j["status"] == "done"] == []


def test_cli_status_shows_each_rpo_state_and_exits_3_on_a_breach(workdir: Path) -> None:
    add_cli("gone", workdir / "gone", "backup=1-7", "backup-rpo=1s")
    add_cli("risky", workdir / "risky", "backup=1-7", "backup-rpo=20h")
    add_cli("fine", workdir / "fine", "backup=1-7", "backup-rpo=26h")
    for name in ("gone", "risky", "fine"):
        ok("backup", name)
    time.sleep(1.1)  # "gone"'s data is now older than its 1s objective
    result = run("status", "--json")
    assert result.exit_code == 3, (result.stdout, result.stderr)
    rows = {r["instance_name"]: r for r in json.loads(result.stdout) if r["region"] == "local:east"}
    assert rows["gone"]["rpo_state"] == "breached" and rows["gone"]["rpo_objective_seconds"] == 1
    assert rows["risky"]["rpo_state"] == "at_risk"  # backed up daily: 24h old before the next
    assert rows["fine"]["rpo_state"] == "met"
    assert all(r["rto_state"] is None for r in rows.values())
    assert "breach" in result.stderr

    table = run("status")  # not a terminal: tab-separated cells, the objectives last
    assert table.exit_code == 3
    # not click's usage error: a typo is told from a breach
    assert run("status", "--bogus").exit_code == 2
    cells = {line.split("\t")[0].split()[0]: line.split("\t") for line in table.stdout.splitlines()}
    assert cells["gone"][-2:] == ["BREACHED (1s)", "-"]
    assert cells["risky"][-2:] == ["at risk (20h00m)", "-"]
    assert cells["fine"][-2:] == ["met (26h)", "-"]
    assert {len(c) for c in cells.values()} == {13}


def test_cli_status_exits_0_with_no_breach(workdir: Path) -> None:
    add_cli("fine", workdir / "fine", "backup=1-7", "backup-rpo=26h")
    ok("backup", "fine")
    rows = json.loads(ok("status", "--json").stdout)
    assert [r["rpo_state"] for r in rows if r["instance_name"] == "fine"] == ["met"]
