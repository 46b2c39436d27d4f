"""The regional pipeline (core/pipeline/engine.py): idempotent backups per slot, concurrent runners,
ticks with an injected clock, malformed tags, copy destinations, restore-and-launch in another
region, retention with WORM locks, status, and the failure hook."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clock_support import clear_of_day_end
from regionvault.core.errors import (
    ComputeError,
    IntegrityError,
    ObjectNotFound,
    RegionVaultError,
    RepositoryNotFound,
    RetentionLocked,
)
from regionvault.core.interfaces import FileSink
from regionvault.core.pipeline import SLOT_TAG, Engine, Service
from regionvault.core.pipeline.jobs import JobStatus, format_slot, slot_of
from regionvault.core.plugins import hookimpl
from regionvault.core.repository import Repository, RepositorySettings, TreeEntry
from regionvault.core.site import Region, Site
from regionvault.core.types import CaptureKind, Instance, LaunchSpec, RecoveryPoint
from regionvault.plugins.samplenf import plugin as samplenf_plugin
from regionvault.plugins.samplenf.plugin import endpoint
from regionvault.providers.local import LocalCompute, LocalFileSink, LocalVault
from repository_support import flip_bit, snapshot
from site_support import open_site, site_toml

SITE_TOML = site_toml(
    {"local:east": "east", "local:west": "west", "local:south": "south"},
    name="pipeline",
    settings={"default_policy": "1-7", "state_dir": "state"},
)

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)
CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"


class Clock:
    """An injected clock: the engine sees ``now``, which the test moves."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


class Recorder:
    """A plugin that records failed jobs and launches."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str | None, BaseException]] = []
        self.launches: list[tuple[str, float | None]] = []

    @hookimpl
    def regionvault_on_job_failure(
        self, job: str, region: str | None, error: BaseException
    ) -> None:
        self.failures.append((job, region, error))

    @hookimpl
    def regionvault_after_launch(
        self,
        region: str,
        instance: Instance,
        recovery_point: RecoveryPoint,
        seconds_to_healthy: float | None,
    ) -> None:
        self.launches.append((region, seconds_to_healthy))


def start_of_clock() -> datetime:
    """Near the real time (recovery points record real creation times), but early enough in
    its UTC day that an hour later is still the same daily slot."""
    now = datetime.now(UTC)
    day = slot_of(now, timedelta(days=1))
    return min(now, day + timedelta(hours=22))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def site_file(tmp_path: Path) -> Path:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(SITE_TOML)
    return path


@pytest.fixture
def site(site_file: Path, recorder: Recorder) -> Iterator[Site]:
    with open_site(site_file, samplenf_plugin, recorder) as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock(start_of_clock())


@pytest.fixture
def engine(site: Site, clock: Clock) -> Engine:
    return Engine(site, clock=clock, settings=SETTINGS, health_timeout=20.0)


@pytest.fixture
def east(site: Site) -> Region:
    return site.region("east")


@pytest.fixture
def west(site: Site) -> Region:
    return site.region("west")


@pytest.fixture
def south(site: Site) -> Region:
    return site.region("south")


def make_data(root: Path, seed: int, files: int = 3, size: int = 64 << 10) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"db-{seed}-{i}.bin").write_bytes(rng.randbytes(size))
    (root / "conf.txt").write_text(f"seed {seed}\n")
    return root


def add(region: Region, name: str, tmp_path: Path, seed: int, **tags: str) -> Instance:
    data = make_data(tmp_path / "data" / name, seed)
    return region.compute.register_instance(name, data, tags=tags)


def home_points(engine: Engine, region: str, instance_id: str | None = None) -> list[RecoveryPoint]:
    return [p for p in engine.repository(region).points(instance_id) if p.lineage is None]


def copies_of(engine: Engine, region: str, instance_id: str | None = None) -> list[RecoveryPoint]:
    return [p for p in engine.repository(region).points(instance_id) if p.lineage is not None]


# --------------------------------------------------------------------------- backup per slot


def test_backup_with_a_slot_is_idempotent(
    engine: Engine, east: Region, clock: Clock, tmp_path: Path
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    slot = slot_of(clock(), timedelta(days=1))
    first = engine.backup(inst.id, slot=slot)
    again = engine.backup(inst.id, slot=slot)
    assert again == first
    assert first.tags[SLOT_TAG] == format_slot(slot)
    assert [p.id for p in home_points(engine, "east")] == [first.id]
    # another slot is another point; no slot always makes a new one
    other = engine.backup(inst.id, slot=slot + timedelta(days=1))
    unslotted = engine.backup(inst.id)
    assert len({first.id, other.id, unslotted.id}) == 3
    assert len(home_points(engine, "east")) == 3
    assert first.expires_at == clock() + timedelta(days=7)


def test_two_runners_in_threads_make_one_point_per_slot(
    site: Site, clock: Clock, east: Region, tmp_path: Path
) -> None:
    instances = [add(east, f"nf-{i}", tmp_path, i) for i in range(4)]
    engines = [Engine(site, clock=clock, settings=SETTINGS) for _ in range(2)]
    barrier = threading.Barrier(2)
    reports: list[Any] = []
    errors: list[BaseException] = []

    def runner(engine: Engine) -> None:
        try:
            barrier.wait(timeout=10)
            reports.append(Service(engine).tick())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(reports) == 2
    assert all(r.ok for r in reports), [r.failures() for r in reports]
    engine = engines[0]
    for inst in instances:
        assert len(home_points(engine, "east", inst.id)) == 1, inst
        assert len(copies_of(engine, "west", inst.id)) == 1, inst
    for region in ("east", "west"):
        report = engine.repository(region).verify(read_data=True)
        assert report.ok, report.errors
    # every backup ran exactly once, in one runner or the other
    done = [
        o.key for r in reports for o in r.jobs if o.kind == "backup" and o.status is JobStatus.DONE
    ]
    assert sorted(done) == sorted(set(done)) and len(done) == 4


def test_two_runner_processes_make_one_point_per_slot(
    site_file: Path, site: Site, east: Region, tmp_path: Path
) -> None:
    instances = [add(east, f"nf-{i}", tmp_path, i, backup="1-7") for i in range(4)]
    env = {**os.environ, "REGIONVAULT_SITE": str(site_file)}
    # the two processes read the real clock: both must plan in one daily slot
    clear_of_day_end()
    procs = [
        subprocess.Popen(
            [str(CONSOLE_SCRIPT), "tick", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp_path,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["ok"] is True
    engine = Engine(site, settings=SETTINGS)
    for inst in instances:
        assert len(home_points(engine, "east", inst.id)) == 1
        assert len(copies_of(engine, "west", inst.id)) == 1
    for region in ("east", "west"):
        assert engine.repository(region).verify(read_data=True).ok


# --------------------------------------------------------------------------- ticks


def test_ticks_follow_the_policy_with_an_injected_clock(
    engine: Engine, clock: Clock, east: Region, west: Region, tmp_path: Path
) -> None:
    untagged = add(east, "vcu-1", tmp_path, 1)  # the tagger gives it the default 1-7
    hourly = add(east, "core-1", tmp_path, 2, backup="1h-1d")

    first = Service(engine).tick()
    assert first.ok, first.failures()
    (tag_east,) = [o for o in first.jobs if o.kind == "tag" and o.region == east.name]
    assert tag_east.result["tagged"] == [untagged.id]
    assert east.compute.get_instance(untagged.id).tags["backup"] == "1-7"
    for inst in (untagged, hourly):
        (point,) = home_points(engine, "east", inst.id)
        (copy,) = copies_of(engine, "west", inst.id)
        assert copy.lineage is not None and copy.lineage.source_recovery_point == point.id
    kinds = sorted(o.kind for o in first.jobs if o.status is JobStatus.DONE)
    assert kinds.count("backup") == 2 and kinds.count("copy") == 2

    # an hour later: the daily instance is not due, the hourly one is
    clock.advance(hours=1)
    second = Service(engine).tick()
    assert second.ok, second.failures()
    assert len(home_points(engine, "east", untagged.id)) == 1
    assert len(copies_of(engine, "west", untagged.id)) == 1
    assert len(home_points(engine, "east", hourly.id)) == 2
    assert len(copies_of(engine, "west", hourly.id)) == 2

    # the same tick again (a second runner, a retried cron job) does nothing new
    again = Service(engine).tick()
    assert all(o.status is JobStatus.REPLAYED for o in again.jobs if o.kind == "backup")
    assert len(home_points(engine, "east")) == 3

    # a day later both are due again, and their new points are copied
    clock.advance(days=1)
    third = Service(engine).tick()
    assert third.ok, third.failures()
    assert len(home_points(engine, "east", untagged.id)) == 2
    assert len(copies_of(engine, "west", untagged.id)) == 2
    newest = home_points(engine, "east", untagged.id)[-1]
    assert newest.tags[SLOT_TAG] == format_slot(slot_of(clock(), timedelta(days=1)))


def test_malformed_tags_are_reported_per_instance_and_the_run_goes_on(
    engine: Engine, east: Region, tmp_path: Path
) -> None:
    good = add(east, "good", tmp_path, 1, backup="1-7")
    bad_policy = add(east, "bad-policy", tmp_path, 2, backup="1-x")
    zero = add(east, "zero", tmp_path, 3, backup="0-7")
    bad_copy = add(east, "bad-copy", tmp_path, 4, **{"backup": "1-7", "backup-copy-to": "mars"})
    opted_out = add(east, "opted-out", tmp_path, 5, backup="none")

    report = Service(engine).tick()
    assert report.ok, report.failures()
    (schedule,) = [s for s in report.schedule if s.region == east.name]
    malformed = {note.instance_id: note.reason for note in schedule.malformed}
    assert set(malformed) == {bad_policy.id, zero.id, bad_copy.id}
    assert "'1-x'" in malformed[bad_policy.id]
    assert "'0-7'" in malformed[zero.id]
    assert "mars" in malformed[bad_copy.id]
    assert [n.instance_id for n in schedule.opted_out] == [opted_out.id]
    # the tag job reports them too
    (tag_east,) = [o for o in report.jobs if o.kind == "tag" and o.region == east.name]
    assert len(tag_east.result["malformed"]) == 3
    # the good one was backed up and copied all the same; the others were not
    assert len(home_points(engine, "east", good.id)) == 1
    assert len(copies_of(engine, "west", good.id)) == 1
    for inst in (bad_policy, zero, bad_copy, opted_out):
        assert home_points(engine, "east", inst.id) == []


def test_the_copy_to_tag_sends_copies_where_it_says(
    engine: Engine, east: Region, tmp_path: Path
) -> None:
    by_pair = add(east, "by-pair", tmp_path, 1, backup="1-7")
    to_south = add(east, "to-south", tmp_path, 2, **{"backup": "1-7", "backup-copy-to": "south"})
    to_both = add(
        east, "to-both", tmp_path, 3, **{"backup": "1-7", "backup-copy-to": "west,local:south"}
    )
    nowhere = add(east, "nowhere", tmp_path, 4, **{"backup": "1-7", "backup-copy-to": "none"})
    report = Service(engine).tick()
    assert report.ok, report.failures()

    def held(instance: Instance) -> set[str]:
        return {r for r in ("west", "south") if copies_of(engine, r, instance.id)}

    assert held(by_pair) == {"west"}
    assert held(to_south) == {"south"}
    assert held(to_both) == {"west", "south"}
    assert held(nowhere) == set()
    for inst in (by_pair, to_south, to_both, nowhere):
        assert len(home_points(engine, "east", inst.id)) == 1


def test_a_failing_job_calls_the_failure_hook_and_the_run_goes_on(
    engine: Engine, east: Region, recorder: Recorder, tmp_path: Path
) -> None:
    fine = add(east, "fine", tmp_path, 1, backup="1-7")
    broken = add(east, "broken", tmp_path, 2, backup="1-7")
    shutil.rmtree(tmp_path / "data" / "broken")  # its capture fails

    report = Service(engine).tick()
    assert not report.ok
    (failed,) = report.failures()
    assert failed.kind == "backup" and broken.id in failed.key
    assert failed.error is not None and "data directory" in failed.error
    assert [(job, region) for job, region, _ in recorder.failures] == [(failed.key, east.name)]
    assert isinstance(recorder.failures[0][2], RegionVaultError)
    assert len(home_points(engine, "east", fine.id)) == 1
    assert len(copies_of(engine, "west", fine.id)) == 1

    # the failure is not recorded as done: once the data is back, the next tick retries
    make_data(tmp_path / "data" / "broken", 2)
    retry = Service(engine).tick()
    assert retry.ok, retry.failures()
    assert len(home_points(engine, "east", broken.id)) == 1


def test_run_ticks_until_stopped(engine: Engine, east: Region, tmp_path: Path) -> None:
    add(east, "vcu-1", tmp_path, 1, backup="1-7")
    stop = threading.Event()
    seen: list[Any] = []
    assert Service(engine).run(stop, interval=timedelta(milliseconds=10), max_ticks=2) == 2

    def on_tick(report: Any) -> None:
        seen.append(report)
        stop.set()

    assert Service(engine).run(stop, interval=timedelta(seconds=30), on_tick=on_tick) == 1
    assert len(seen) == 1 and seen[0].ok
    stop.set()
    assert Service(engine).run(stop) == 0  # already stopped: no tick at all
    assert len(home_points(engine, "east")) == 1


# --------------------------------------------------------------------------- restore and launch


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _post(url: str) -> None:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def wait_for_endpoint(region: Region, instance_id: str, ticks: int = 400) -> str:
    for _ in range(ticks):  # bounded: 400 x 50 ms
        base = endpoint(region.compute.get_instance(instance_id))
        if base is not None:
            return base
        threading.Event().wait(0.05)
    raise AssertionError(f"{instance_id} never answered")


@pytest.fixture
def launched(site: Site) -> Iterator[list[tuple[Region, str]]]:
    running: list[tuple[Region, str]] = []
    yield running
    for region, instance_id in running:
        with contextlib.suppress(RegionVaultError):
            region.compute.terminate(instance_id)


def test_restore_and_launch_in_west_serves_the_same_state(
    engine: Engine,
    east: Region,
    west: Region,
    clock: Clock,
    launched: list[tuple[Region, str]],
    recorder: Recorder,
) -> None:
    function = f"{sys.executable} -m regionvault.plugins.samplenf"
    spec = LaunchSpec(name="vcore-1", function=function, tags={"backup": "1-7"})
    sink = east.compute.open_restore_sink(spec, CaptureKind.FILES)
    assert isinstance(sink, FileSink)
    nf = east.compute.launch(spec, sink)
    launched.append((east, nf.id))
    base = wait_for_endpoint(east, nf.id)
    for i in range(25):
        _post(f"{base}/attach?imsi=00101{i:010d}")
    east_state = _get(f"{base}/state")
    assert len(east_state["subscribers"]) == 25

    point = engine.backup(nf.id)
    assert point.function == function
    copy = engine.copy(point.id, to="west").point
    result = engine.restore(copy.id, region="west", launch=True, name="vcore-1-west")
    assert result.instance is not None
    launched.append((west, result.instance.id))
    assert result.healthy and result.seconds_to_healthy is not None
    assert result.instance.region == west.name
    assert result.instance.function == function
    assert result.instance.tags["backup"] == "1-7" and SLOT_TAG not in result.instance.tags

    west_base = endpoint(result.instance)
    assert west_base is not None and west_base != base
    west_state = _get(f"{west_base}/state")
    assert west_state["digest"] == east_state["digest"]
    assert west_state["subscribers"] == east_state["subscribers"]
    # ... and it is its own process: a new attach in west does not show in east
    _post(f"{west_base}/attach?imsi=001019999999999")
    assert _get(f"{base}/state")["digest"] == east_state["digest"]

    # the RTO is recorded as a drill, shown by status, and reported to the hook
    assert recorder.launches == [(west.name, result.seconds_to_healthy)]
    drill = engine.state.last_drill(west.name, nf.id)
    assert drill is not None and drill.healthy
    assert drill.rto_seconds == result.seconds_to_healthy
    assert drill.point_id == copy.id and drill.launched_id == result.instance.id
    (row,) = [r for r in engine.status() if r.region == west.name and r.instance_id == nf.id]
    assert row.last_drill_rto == result.seconds_to_healthy
    assert row.last_drill_healthy is True and row.last_drill_at == clock()


def test_launching_the_same_point_twice_gets_a_free_name(
    engine: Engine, east: Region, west: Region, tmp_path: Path
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    copy = engine.copy(engine.backup(inst.id).id, to="west").point
    first = engine.restore(copy.id, region="west", launch=True)
    second = engine.restore(copy.id, region="west", launch=True)
    assert first.instance is not None and second.instance is not None
    assert first.instance.name == f"vcu-1-{copy.id[:8]}"
    assert second.instance.name == f"vcu-1-{copy.id[:8]}-2"
    before = list(west.compute.list_instances())
    # a name already taken is refused before anything is restored
    with pytest.raises(RegionVaultError, match="already has an instance named 'vcu-1-"):
        engine.restore(copy.id, region="west", launch=True, name=first.instance.name)
    assert list(west.compute.list_instances()) == before
    # once a drill is torn down, its name is free again
    west.compute.terminate(first.instance.id)
    third = engine.restore(copy.id, region="west", launch=True, name=first.instance.name)
    assert third.healthy and third.instance is not None


def test_restore_needs_a_target_or_launch(engine: Engine, east: Region, tmp_path: Path) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    point = engine.backup(inst.id)
    with pytest.raises(RegionVaultError, match="target"):
        engine.restore(point.id, region="east")
    with pytest.raises(RegionVaultError, match="no recovery point"):
        engine.restore(point.id, region="west", target=tmp_path / "out")
    out = tmp_path / "out"
    result = engine.restore(point.id[:8], region="east", target=out)
    assert result.point.id == point.id
    assert snapshot(out) == snapshot(tmp_path / "data" / "vcu-1")


# --------------------------------------------------------------------------- failed launches


def instance_dirs(region: Region) -> set[str]:
    """What the local Compute holds on disk: one directory per instance or pending sink."""
    compute = region.compute
    assert isinstance(compute, LocalCompute)
    if not compute.instances_dir.exists():
        return set()
    return {p.name for p in compute.instances_dir.iterdir()}


@pytest.fixture
def opened(east: Region, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every restore sink east's Compute makes during the test."""
    sinks: list[Any] = []
    open_sink = east.compute.open_restore_sink

    def recording_open(*args: Any, **kwargs: Any) -> Any:
        sink = open_sink(*args, **kwargs)
        sinks.append(sink)
        return sink

    monkeypatch.setattr(east.compute, "open_restore_sink", recording_open)
    return sinks


def test_a_launch_that_raises_leaves_no_restored_data_behind(
    engine: Engine,
    east: Region,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    opened: list[Any],
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    point = engine.backup(inst.id)
    before = instance_dirs(east)

    def failing_launch(spec: LaunchSpec, sink: Any) -> Instance:
        assert any(p.is_file() for p in sink.root.iterdir())  # the data was restored
        raise ComputeError("the hypervisor said no", provider="local", region=east.name)

    monkeypatch.setattr(east.compute, "launch", failing_launch)
    with pytest.raises(ComputeError, match="the hypervisor said no"):
        engine.restore(point.id, region="east", launch=True)
    (sink,) = opened
    assert not sink.root.exists()
    assert instance_dirs(east) == before
    assert engine.state.last_drill(east.name, inst.id) is None  # no drill happened
    assert [i.id for i in east.compute.list_instances()] == [inst.id]


def test_a_restore_that_fails_half_way_leaves_no_restored_data_behind(
    engine: Engine, east: Region, tmp_path: Path, opened: list[Any]
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    point = engine.backup(inst.id)
    before = instance_dirs(east)
    vault = east.vault
    assert isinstance(vault, LocalVault)
    packs = sorted(p for p in (vault.objects_dir / "packs").rglob("*") if p.is_file())
    assert packs
    flip_bit(packs[-1], packs[-1].stat().st_size // 2)
    with pytest.raises(IntegrityError):
        engine.restore(point.id, region="east", launch=True)
    (sink,) = opened  # the failure came while restoring into it
    assert not sink.root.exists()
    assert instance_dirs(east) == before
    assert [i.id for i in east.compute.list_instances()] == [inst.id]


def test_a_sink_that_cannot_be_discarded_does_not_hide_the_launch_error(
    engine: Engine, east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    point = engine.backup(inst.id)

    def failing_launch(spec: LaunchSpec, sink: Any) -> Instance:
        raise ComputeError("launch failed", provider="local", region=east.name)

    def failing_discard(self: LocalFileSink) -> None:
        raise ComputeError("disk is read-only", provider="local", region=east.name)

    monkeypatch.setattr(east.compute, "launch", failing_launch)
    monkeypatch.setattr(LocalFileSink, "discard", failing_discard)
    with pytest.raises(ComputeError, match="launch failed") as raised:
        engine.restore(point.id, region="east", launch=True)
    notes = getattr(raised.value, "__notes__", [])
    assert any("could not be discarded" in n and "disk is read-only" in n for n in notes)


class HealthAnswer:
    """A health-check plugin with a fixed answer, or one that raises."""

    def __init__(self, answer: bool | None = False, error: Exception | None = None) -> None:
        self.answer = answer
        self.error = error
        self.asked = 0

    @hookimpl
    def regionvault_health_check(self, region: str, instance: Instance) -> bool | None:
        self.asked += 1
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.mark.parametrize(
    ("plugin", "why"),
    [
        (HealthAnswer(False), "not healthy after 0.2s"),
        (HealthAnswer(error=RuntimeError("probe crashed")), "health check raised RuntimeError"),
    ],
    ids=["unhealthy", "health-check-raises"],
)
def test_an_unhealthy_launch_is_kept_and_reported(
    site: Site,
    clock: Clock,
    east: Region,
    tmp_path: Path,
    recorder: Recorder,
    plugin: HealthAnswer,
    why: str,
) -> None:
    """An instance that exists is never removed by the engine: a failed health check is
    reported (result, drill, hook) and the instance stays for inspection."""
    engine = Engine(site, clock=clock, settings=SETTINGS, health_timeout=0.2)
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    point = engine.backup(inst.id)
    site.plugin_manager.register(plugin)
    try:
        result = engine.restore(point.id, region="east", launch=True)
    finally:
        site.plugin_manager.unregister(plugin)
    assert plugin.asked >= 1
    assert result.instance is not None and not result.healthy
    assert result.health_error is not None and why in result.health_error
    kept = east.compute.get_instance(result.instance.id)
    assert kept.state == "running"
    assert result.target is not None and result.target.is_dir() and any(result.target.iterdir())
    drill = engine.state.last_drill(east.name, inst.id)
    assert drill is not None and drill.healthy is False and drill.launched_id == kept.id
    assert recorder.launches == [(east.name, None)]
    east.compute.terminate(kept.id)
    assert not result.target.exists()


# --------------------------------------------------------------------------- retention


def chunks_of(repo: Repository, point_id: str) -> set[bytes]:
    ids: set[bytes] = set()
    for entry in repo.entries(point_id):
        assert isinstance(entry, TreeEntry)
        ids.update(entry.chunks)
    return ids


def test_retention_forgets_exactly_the_expired_points_and_keeps_worm_locked_ones(
    engine: Engine, clock: Clock, east: Region, west: Region, tmp_path: Path
) -> None:
    data = tmp_path / "data" / "vcu-1"
    make_data(data, 1)
    inst = east.compute.register_instance(
        "vcu-1", data, tags={"backup": "1-7", "backup-copy-keep": "14d"}
    )
    points: list[RecoveryPoint] = []
    for day in range(3):
        # entirely new data each day, so no point shares a pack with another
        shutil.rmtree(data)
        make_data(data, 10 + day)
        points.append(engine.backup(inst.id))
        engine.copy(points[-1].id, to="west")
        clock.advance(days=1)
    p1, p2, p3 = points
    assert [p.expires_at for p in points] == [
        p1.expires_at,
        p1.expires_at + timedelta(days=1),  # type: ignore[operator]
        p1.expires_at + timedelta(days=2),  # type: ignore[operator]
    ]
    east_repo = engine.repository("east")
    east_repo.protect(p2.id, until=datetime.now(UTC) + timedelta(days=30))
    only_p1 = chunks_of(east_repo, p1.id)
    west_copies = copies_of(engine, "west")
    # copies are kept by the copy retention (14d from the source point), not the policy's 7d
    for copy, point in zip(west_copies, points, strict=True):
        assert copy.expires_at == point.created_at + timedelta(days=14)

    # before anything expires: nothing happens
    nothing = engine.retain("east")
    assert (nothing.forgotten, nothing.protected) == ([], [])

    # a day past p2's expiry: p1 goes, p2 is WORM-locked and stays, p3 is not due yet
    clock.now = p2.expires_at + timedelta(hours=1)  # type: ignore[operator]
    report = engine.retain("east")
    assert report.forgotten == [p1.id]
    assert report.protected == [p2.id]
    assert [p.id for p in east_repo.points()] == [p2.id, p3.id]
    with pytest.raises(RetentionLocked):
        east_repo.forget([p2.id])
    # ... and p1's data was collected
    assert report.prune["packs_deleted"] >= 1 and report.prune["bytes_freed"] > 0
    index = east_repo._ensure_open().load_index().index
    assert only_p1 and not any(c in index for c in only_p1)
    assert east_repo.verify(read_data=True).ok
    for point in (p2, p3):
        out = tmp_path / f"out-{point.id}"
        east_repo.restore(point.id, out)

    # west keeps every copy at that time (14 days) ...
    assert engine.retain("west").forgotten == []
    assert len(copies_of(engine, "west")) == 3
    # ... and forgets exactly the expired ones when their time comes
    clock.now = west_copies[1].expires_at  # type: ignore[assignment]
    expired = [c.id for c in west_copies if c.expires_at <= clock.now]  # type: ignore[operator]
    west_report = engine.retain("west")
    assert sorted(west_report.forgotten) == sorted(expired) and expired
    assert [c.id for c in copies_of(engine, "west")] == [
        c.id for c in west_copies if c.id not in expired
    ]
    assert engine.repository("west").verify(read_data=True).ok


def test_tick_applies_retention(engine: Engine, clock: Clock, east: Region, tmp_path: Path) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1d-2d")
    Service(engine).tick()
    (first,) = home_points(engine, "east", inst.id)
    clock.advance(days=3)
    report = Service(engine).tick()
    assert report.ok, report.failures()
    (retained,) = [o for o in report.jobs if o.kind == "retention" and o.region == east.name]
    assert retained.result["forgotten"] == [first.id]
    assert [p.id for p in home_points(engine, "east", inst.id)] != [first.id]
    assert len(home_points(engine, "east", inst.id)) == 1  # the new one of this tick


# --------------------------------------------------------------------------- status


def test_status_shows_rpo_last_copy_and_last_drill(
    engine: Engine, clock: Clock, east: Region, west: Region, tmp_path: Path
) -> None:
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    other = add(east, "vcu-2", tmp_path, 2, backup="1-7")
    assert [r.points for r in engine.status()] == [0, 0]  # listed, never backed up
    point = engine.backup(inst.id)
    copy = engine.copy(point.id, to="west").point
    engine.backup(other.id)
    taken = engine.repository("east").load_manifest(point.id).taken_at
    # two hours after the data was taken (its real time), not after the clock's start:
    # start_of_clock may start the clock up to two hours before the real time (late in a UTC
    # day), or just before a taken_at that falls past midnight
    clock.now = taken + timedelta(hours=2)

    rows = {(r.instance_id, r.region): r for r in engine.status()}
    assert set(rows) == {(inst.id, east.name), (inst.id, west.name), (other.id, east.name)}
    home, away = rows[(inst.id, east.name)], rows[(inst.id, west.name)]
    assert (home.role, away.role) == ("home", "copy")
    assert home.newest_point == point.id and away.newest_point == copy.id
    # RPO: the age of the data, from the injected clock; the copy's data is as old as east's
    assert home.rpo_seconds == (clock() - taken).total_seconds() == 7200
    assert away.rpo_seconds == home.rpo_seconds
    assert home.last_copy_at is None and away.last_copy_at == copy.created_at
    assert away.last_drill_rto is None and rows[(other.id, east.name)].last_copy_at is None

    result = engine.restore(copy.id, region="west", launch=True)
    assert result.healthy and result.instance is not None
    engine.region("west").compute.terminate(result.instance.id)
    (after,) = [r for r in engine.status() if (r.instance_id, r.region) == (inst.id, west.name)]
    assert after.last_drill_rto == result.seconds_to_healthy
    assert after.last_drill_healthy is True and after.last_drill_at == clock()
    data = after.to_dict()
    assert data["rpo_seconds"] == home.rpo_seconds and data["last_drill_rto"] is not None
    json.dumps(data)


# --------------------------------------------------------------------------- reading only


def test_reading_never_creates_a_repository(
    engine: Engine, east: Region, west: Region, south: Region, tmp_path: Path
) -> None:
    """Listing, status, retention, restore and the scheduler only open repositories; backup
    and the receiving end of a copy create them."""
    vaults = {r.name: r.vault for r in (east, west, south)}
    with pytest.raises(RepositoryNotFound) as missing:
        Repository.open(south.vault, south.keys, region=south.name)
    assert isinstance(missing.value, ObjectNotFound) and missing.value.name == "config"
    assert missing.value.region == south.name and missing.value.provider == "local"
    assert str(missing.value).startswith("no repository in local:south yet")
    assert engine.status() == []
    assert engine.retain("south").forgotten == []
    with pytest.raises(RepositoryNotFound, match=r"no repository in local:south yet"):
        engine.repository("south", create=False)
    with pytest.raises(RepositoryNotFound, match=r"no recovery point 'abcdef12' in local:south"):
        engine.restore("abcdef12", region="south", launch=True)
    with pytest.raises(RepositoryNotFound):
        engine.restore("abcdef12", region="south", target=tmp_path / "out")
    with pytest.raises(RegionVaultError, match=r"no recovery point 'abcdef12'$"):
        engine.find_point("abcdef12")
    assert instance_dirs(south) == set()
    assert {name: list(v.list()) for name, v in vaults.items()} == {n: [] for n in vaults}

    # a tick backs up in east and copies to west: south, with nothing of its own and no
    # copies coming in, still holds no repository afterwards
    inst = add(east, "vcu-1", tmp_path, 1, backup="1-7")
    report = Service(engine).tick()
    assert report.ok, (report.problems, report.failures())
    assert len(home_points(engine, "east", inst.id)) == 1
    assert len(copies_of(engine, "west", inst.id)) == 1
    assert list(south.vault.list()) == []
    assert [r.region for r in engine.status()] == [east.name, west.name]
