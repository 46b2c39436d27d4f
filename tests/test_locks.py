"""Locks by policy and from the CLI (core/pipeline/locks.py, core/cli/locks.py): a point's
policy lock and hold at its commit and at its copy's, found again after a kill between the
commit and the lock, extended by prune for what a protected point uses, and ``lock`` /
``hold`` / ``release`` / ``forget`` with their refusals."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cli_support import run
from regionvault.core import ProviderRegistry, RegionConfig, hookimpl
from regionvault.core.errors import LockedError, RetentionLocked
from regionvault.core.pipeline import Engine, Service
from regionvault.core.pipeline import locks as locks_module
from regionvault.core.pipeline.locks import (
    LockFailed,
    LockRefused,
    hold_point,
    lock_point,
    release_point,
)
from regionvault.core.repository import Repository, RepositorySettings
from regionvault.core.repository import _retention as retention_module
from regionvault.core.site import Region, Site
from regionvault.core.types import Capabilities, Instance, ObjectInfo, RetentionMode, Tags
from regionvault.providers.local import LocalProvider, LocalVault
from site_support import open_site, site_toml

SETTINGS = RepositorySettings(pack_size=1 << 20, workers=2)

#: a backup of argv[2] on the site argv[1] that kills its own process right after the commit
KILLED_AFTER_COMMIT = """
import os, signal, sys
from regionvault.core.pipeline import Engine, locks as locks_module
from regionvault.core.site import Site

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

locks_module.apply_policy_lock = die
with Site.load(sys.argv[1]) as site:
    Engine(site).backup(sys.argv[2])
"""
LOCK_30D = {"backup": "1-7", "backup-lock": "compliance-30d"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def make_data(root: Path, seed: int, files: int = 3, size: int = 64 << 10) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"db-{seed}-{i}.bin").write_bytes(rng.randbytes(size))
    return root


def add(region: Region, name: str, tmp_path: Path, seeds: tuple[int, ...], **tags: str) -> Instance:
    root = tmp_path / "data" / name
    for seed in seeds:
        make_data(root, seed)
    return region.compute.register_instance(name, root, tags=tags)


@pytest.fixture
def site_path(tmp_path: Path) -> Path:
    path = tmp_path / "site" / "site.toml"
    path.parent.mkdir()
    path.write_text(site_toml(name="locks", settings={"state_dir": "state"}))
    return path


@pytest.fixture
def site(site_path: Path) -> Iterator[Site]:
    with open_site(site_path) as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(site: Site, clock: Clock) -> Engine:
    return Engine(site, clock=clock, settings=SETTINGS)


def head(repo: Repository, name: str) -> ObjectInfo:
    return repo.vault.head(name)


def objects_of(repo: Repository, point_id: str) -> list[ObjectInfo]:
    """Every object in the vault but the repository's own housekeeping, by kind."""
    return [
        info
        for prefix in ("packs/", "index/", f"points/{point_id}")
        for info in repo.vault.list(prefix)
    ]


def cli(site_path: Path, *args: str) -> Any:
    return run("--site", site_path, *args)


# --------------------------------------------------------------------------- by policy


def test_a_policy_lock_is_applied_at_commit_refuses_forget_and_retention_keeps_it(
    engine: Engine, site_path: Path, clock: Clock, tmp_path: Path
) -> None:
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    point = engine.backup(inst.id)
    repo = engine.repository("east")
    manifest = repo.point_object(point.id)
    assert manifest.retention_mode is RetentionMode.COMPLIANCE
    assert manifest.retain_until == manifest.modified + timedelta(days=30)
    # every pack and index object the point uses carries the lock too
    used = [i for i in objects_of(repo, point.id) if not i.name.startswith("points/")]
    assert used and all(i.retain_until == manifest.retain_until for i in used)

    with pytest.raises(RetentionLocked, match="retained until"):
        repo.forget([point.id])
    refused = cli(site_path, "forget", point.id[:8])
    assert refused.exit_code == 1
    assert "cannot be forgotten" in refused.stderr and "until" in refused.stderr
    assert refused.stderr.count("\n") == 1

    # past the policy's 7 days (the engine's clock): retention keeps it, and says why
    clock.now += timedelta(days=8)
    report = Service(engine).tick("east")
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["forgotten"] == []
    assert retained.result["protected"] == [point.id]
    assert retained.result["kept"][point.id].startswith("kept: locked until ")
    assert point.id in [p.id for p in repo.points()]


def test_a_hold_by_site_policy_is_applied_and_a_bad_lock_tag_fails_after_the_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            name="locks", settings={"state_dir": "state"}, extra="[operations]\nhold = 'on'\n"
        )
    )
    with open_site(path) as site:
        engine = Engine(site, settings=SETTINGS)
        east = site.region("east")
        held = engine.backup(add(east, "held", tmp_path, (1,), backup="1-7").id)
        repo = engine.repository("east")
        assert repo.point_object(held.id).legal_hold
        assert repo.point_object(held.id).retain_until is None
        bad = add(east, "bad", tmp_path, (2,), **{"backup": "1-7", "backup-lock": "forever"})
        with pytest.raises(LockFailed, match="backup-lock='forever'") as caught:
            engine.backup(bad.id)
        assert "not a lock" in str(caught.value)
        # data first: the point is there
        assert [p.instance_id for p in repo.points(bad.id)] == [bad.id]


def test_a_copy_carries_its_own_lock_in_the_destination(
    engine: Engine, site: Site, tmp_path: Path
) -> None:
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    point = engine.backup(inst.id)
    copy = engine.copy(point.id, to="west").point
    west = engine.repository("west")
    info = west.point_object(copy.id)
    # from the copy's own commit in the destination, not the source point's
    assert info.retain_until == info.modified + timedelta(days=30)
    assert info.retention_mode is RetentionMode.COMPLIANCE
    with pytest.raises(RetentionLocked):
        west.forget([copy.id])

    # the phased copy: the destination's copy-commit job locks it
    split = Engine(site, settings=SETTINGS, split_copies=True)
    second = split.backup(add(east, "ims", tmp_path, (2,), **LOCK_30D).id)
    report = Service(split).tick()
    assert report.ok, report.failures()
    (phased,) = [p for p in west.points(second.instance_id) if p.lineage is not None]
    info = west.point_object(phased.id)
    assert info.retain_until == info.modified + timedelta(days=30)


def test_a_kill_between_commit_and_lock_is_healed_by_the_next_tick(
    engine: Engine, clock: Clock, site_path: Path, tmp_path: Path
) -> None:
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    locked = engine.backup(inst.id)  # an older point, locked at its commit
    make_data(tmp_path / "data" / "hlr", 5)
    # a backup in its own process, SIGKILLed the moment its point is committed, before the
    # lock: nothing after runs (no finally, no atexit)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(site_path), inst.id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    repo = engine.repository("east")
    newest = [p for p in repo.points(inst.id) if p.id != locked.id]
    assert len(newest) == 1
    assert repo.point_object(newest[0].id).retain_until is None  # committed, unlocked

    report = Service(engine).tick("east")
    assert report.ok, report.failures()
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["locks_applied"] == [newest[0].id]
    info = repo.point_object(newest[0].id)
    assert info.retain_until == info.modified + timedelta(days=30)
    # and the next tick (its next slot, with a new backup locked at its commit) finds
    # nothing to do
    clock.now += timedelta(days=1)
    later = Service(engine).tick("east")
    assert later.ok, later.failures()
    (again,) = [o for o in later.jobs if o.kind == "retention"]
    assert again.status.value == "done"
    assert "locks_applied" not in again.result


def test_a_copy_left_unlocked_is_healed_by_the_destinations_own_tick(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    east = engine.region("east")
    point = engine.backup(add(east, "hlr", tmp_path, (1,), **LOCK_30D).id)

    class Killed(BaseException):
        pass

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed  # the copy is committed in west; its lock never comes

    monkeypatch.setattr(locks_module, "apply_policy_lock", killed)
    with pytest.raises(Killed):
        engine.copy(point.id, to="west")
    monkeypatch.undo()
    west = engine.repository("west")
    (copy,) = west.points()
    assert west.point_object(copy.id).retain_until is None

    report = Service(engine).tick("west")  # west's own tick, west's credentials
    assert report.ok, report.failures()
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["locks_applied"] == [copy.id]
    info = west.point_object(copy.id)
    assert info.retain_until == info.modified + timedelta(days=30)
    assert info.retention_mode is RetentionMode.COMPLIANCE


def _killed_backup(site_path: Path, instance_id: str) -> None:
    """A backup in its own process, SIGKILLed the moment its point is committed."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, str(site_path), instance_id],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def test_an_older_unlocked_point_is_healed_after_a_newer_one_was_locked_at_commit(
    engine: Engine, clock: Clock, site_path: Path, tmp_path: Path
) -> None:
    # review HIGH 1: the heal stopped at the newest locked point, so a point killed before
    # its lock stayed unlocked once the next slot's backup (locked at its commit) came first
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    _killed_backup(site_path, inst.id)
    repo = engine.repository("east")
    (first,) = repo.points(inst.id)
    assert repo.point_object(first.id).retain_until is None
    # the next slot's tick: its backup commits and locks a newer point before retention
    clock.now += timedelta(days=2)
    make_data(tmp_path / "data" / "hlr", 7)
    report = Service(engine).tick("east")
    assert report.ok, report.failures()
    assert [o.kind for o in report.jobs].index("backup") < [o.kind for o in report.jobs].index(
        "retention"
    )
    newer = [p for p in repo.points(inst.id) if p.id != first.id]
    assert len(newer) == 1 and repo.point_object(newer[0].id).retain_until is not None
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["locks_applied"] == [first.id]
    info = repo.point_object(first.id)
    assert info.retain_until == info.modified + timedelta(days=30)
    assert info.retention_mode is RetentionMode.COMPLIANCE
    # past its retention, it is kept by its lock, not forgotten
    clock.now += timedelta(days=8)
    later = Service(engine).tick("east")
    (again,) = [o for o in later.jobs if o.kind == "retention"]
    assert first.id not in again.result["forgotten"]
    assert first.id in again.result["protected"]


def test_a_lock_rule_added_to_the_site_later_locks_new_points_only(
    site_path: Path, tmp_path: Path
) -> None:
    # review HIGH 2: the rule was resolved again at each heal, from today's site.toml
    with open_site(site_path) as site:
        engine = Engine(site, settings=SETTINGS)
        inst = add(engine.region("east"), "hlr", tmp_path, (1,), backup="1-7")
        old = engine.backup(inst.id)
        assert old.tags[locks_module.RULE_TAG] == "none"
    site_path.write_text(site_path.read_text() + '\n[operations]\nlock = "compliance-30d"\n')
    with open_site(site_path) as site:
        engine = Engine(site, settings=SETTINGS)
        report = Service(engine).tick("east")
        assert report.ok, report.failures()
        (retained,) = [o for o in report.jobs if o.kind == "retention"]
        assert "locks_applied" not in retained.result
        repo = engine.repository("east")
        assert repo.point_object(old.id).retain_until is None
        # a new point takes the new rule, recorded in its tags, and its copy carries it
        make_data(tmp_path / "data" / "hlr", 2)
        new = engine.backup(inst.id)
        assert new.tags[locks_module.RULE_TAG] == "compliance-30d"
        info = repo.point_object(new.id)
        assert info.retain_until == info.modified + timedelta(days=30)
        copy = engine.copy(old.id, to="west").point
        assert copy.tags[locks_module.RULE_TAG] == "none"
        assert engine.repository("west").point_object(copy.id).retain_until is None
    # the rule dropped from the site again: the new point keeps its lock rule for a heal
    site_path.write_text(site_path.read_text().replace('lock = "compliance-30d"', ""))
    with open_site(site_path) as site:
        engine = Engine(site, settings=SETTINGS)
        (point,) = [p for p in engine.repository("east").points(inst.id) if p.id == new.id]
        wanted = locks_module.wanted_protection(point, info.modified, datetime.now(UTC))
        assert wanted is not None and wanted.until == info.retain_until


def test_a_hold_rule_is_recorded_with_the_lock_and_a_bad_recorded_rule_fails_loudly(
    engine: Engine, tmp_path: Path
) -> None:
    east = engine.region("east")
    held = engine.backup(add(east, "hlr", tmp_path, (1,), **{**LOCK_30D, "backup-hold": "on"}).id)
    assert held.tags[locks_module.RULE_TAG] == "compliance-30d-hold"
    assert engine.repository("east").point_object(held.id).legal_hold
    # the rule is the point's, not an instance's: a restore's launched instance lacks it
    launched = engine.restore(held.id, region="east", launch=True).instance
    assert launched is not None and locks_module.RULE_TAG not in launched.tags
    assert launched.tags.get("backup-hold") == "on"
    forged = dataclasses.replace(held, tags=Tags({**held.tags, locks_module.RULE_TAG: "x"}))
    with pytest.raises(LockFailed, match="regionvault-lock='x' is not a recorded lock rule"):
        locks_module.wanted_protection(forged, datetime.now(UTC), datetime.now(UTC))


def test_a_hold_released_by_hand_is_not_put_back_by_the_heal_on_any_host(
    engine: Engine, clock: Clock, site_path: Path, tmp_path: Path
) -> None:
    # review LOW 7: a released policy hold came back at the next retention job when the
    # point was the newest of its instance; the release (in the region's event log) stands
    east = engine.region("east")
    held = add(east, "held", tmp_path, (1,), **{"backup": "1-7", "backup-hold": "on"})
    point = engine.backup(held.id)
    repo = engine.repository("east")
    assert repo.point_object(point.id).legal_hold
    engine.release_point(point.id)
    assert not repo.point_object(point.id).legal_hold
    # and a point of another instance killed before its hold: healed in the same job
    other = add(east, "other", tmp_path, (2,), **{"backup": "1-7", "backup-hold": "on"})
    _killed_backup(site_path, other.id)
    (killed,) = repo.points(other.id)
    state = engine.state.root / "locks"
    assert not state.exists()  # a host whose first heal looks at every point
    report = Service(engine).tick("east")
    assert report.ok, report.failures()
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["locks_applied"] == [killed.id]
    assert retained.result["locks_released_by_hand"] == [point.id]
    assert not repo.point_object(point.id).legal_hold
    assert repo.point_object(killed.id).legal_hold
    assert state.is_dir()


def test_the_heal_looks_at_points_since_its_last_complete_run_and_every_point_on_a_new_host(
    engine: Engine, site_path: Path, tmp_path: Path
) -> None:
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    _killed_backup(site_path, inst.id)
    repo = engine.repository("east")
    (point,) = repo.points(inst.id)
    state = tmp_path / "state-of-a-host"
    assert locks_module.heal_since(state, "local:east") is None  # a new host: every point
    # a host whose last complete heal started after this commit (plus the margin) skips it
    later = repo.point_object(point.id).modified + locks_module.HEAL_MARGIN * 2
    locks_module.record_heal(state, "local:east", later)
    since = locks_module.heal_since(state, "local:east")
    assert since == later - locks_module.HEAL_MARGIN
    skipped = locks_module.heal_locks(lambda: repo, since=since)
    assert skipped is not None and (skipped.locked, skipped.checked) == ([], 0)
    assert repo.point_object(point.id).retain_until is None
    healed = locks_module.heal_locks(lambda: repo, since=None)
    assert healed is not None and healed.locked == [point.id] and healed.checked == 1
    # once locked, the local vault's listing says so: no HEAD the next time
    again = locks_module.heal_locks(lambda: repo, since=None)
    assert again is not None and (again.locked, again.checked) == ([], 0)
    # an unreadable record is no record
    (state / "locks" / "heal-local%3Aeast.json").write_text("{")
    assert locks_module.heal_since(state, "local:east") is None


def test_an_older_copy_left_unlocked_is_healed_after_a_newer_copy_was_locked(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # review HIGH 1, for copies: a copy committed in west whose lock never came (killed after
    # its receipt), then a newer copy locked at its commit: west's heal finds the older one
    east = engine.region("east")
    inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
    first = engine.backup(inst.id)

    class Killed(BaseException):
        pass

    def killed(*args: object, **kwargs: object) -> None:
        raise Killed

    monkeypatch.setattr(locks_module, "apply_policy_lock", killed)
    with pytest.raises(Killed):
        engine.copy(first.id, to="west")
    monkeypatch.undo()
    make_data(tmp_path / "data" / "hlr", 4)
    second = engine.backup(inst.id)
    newer = engine.copy(second.id, to="west").point
    west = engine.repository("west")
    assert west.point_object(newer.id).retain_until is not None
    (older,) = [p for p in west.points() if p.id != newer.id]
    assert west.point_object(older.id).retain_until is None

    report = Service(engine).tick("west")
    assert report.ok, report.failures()
    (retained,) = [o for o in report.jobs if o.kind == "retention"]
    assert retained.result["locks_applied"] == [older.id]
    info = west.point_object(older.id)
    assert info.retain_until == info.modified + timedelta(days=30)


# --------------------------------------------------------------------------- a vault without


class NoWormVault(LocalVault):
    """The local vault without WORM: as a vault whose cloud offers none."""

    def set_retention(self, name: str, until: datetime, mode: Any = None, **kw: Any) -> Any:
        raise self.unsupported("set_retention")

    def set_legal_hold(self, name: str, on: bool) -> Any:
        raise self.unsupported("set_legal_hold")


class NoWormProvider(LocalProvider):
    name: ClassVar[str] = "noworm"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(
        LocalProvider.capabilities, worm_lock=False, legal_hold=False
    )

    def vault(self, region: RegionConfig) -> LocalVault:
        return NoWormVault(
            root=self._root(region),
            provider=self.name,
            region=region.name,
            capabilities=self.capabilities,
        )


class NoWormPlugin:
    @hookimpl
    def regionvault_register_providers(self, registry: ProviderRegistry) -> None:
        registry.add(NoWormProvider)


def test_a_vault_without_worm_commits_the_point_and_fails_the_job_loudly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            {"noworm:east": "east", "noworm:west": "west"},
            settings={"state_dir": "state"},
            replicate=("noworm:east", "noworm:west"),
        )
    )
    with open_site(path, NoWormPlugin()) as site:
        engine = Engine(site, settings=SETTINGS)
        east = site.region("east")
        inst = add(east, "hlr", tmp_path, (1,), **LOCK_30D)
        with pytest.raises(LockFailed, match="committed but not locked") as caught:
            engine.backup(inst.id)
        assert "compliance-30d" in str(caught.value)
        assert "set_retention is not supported" in str(caught.value)
        repo = engine.repository("east")
        (point,) = repo.points(inst.id)  # data first

        # the tick: the retention job finds it still unlocked and fails, naming it
        report = Service(engine).tick("noworm:east")
        (retained,) = [o for o in report.jobs if o.kind == "retention"]
        assert retained.status.value == "failed"
        assert point.id in (retained.error or "") and "not locked" in (retained.error or "")
        assert not report.ok
        # every point of the instance fails the same way: one line for it, the rest counted
        make_data(tmp_path / "data" / "hlr", 2)
        with pytest.raises(LockFailed):
            engine.backup(inst.id)
        healed = locks_module.heal_locks(lambda: repo)
        assert healed is not None and len(healed.failed) == 1 and healed.locked == []
        assert healed.failed[0].endswith(f"(and 1 more point(s) of {inst.id})")
        assert "\n" not in healed.failed[0]

        with pytest.raises(LockRefused, match="does not offer worm_lock"):
            lock_point(
                repo, point.id, datetime.now(UTC) + timedelta(days=1), RetentionMode.GOVERNANCE
            )
        with pytest.raises(LockRefused, match="does not offer legal_hold"):
            hold_point(repo, point.id)


# --------------------------------------------------------------------------- prune


def test_prune_extends_the_locks_of_what_a_newer_locked_point_uses(
    engine: Engine, tmp_path: Path
) -> None:
    east = engine.region("east")
    repo = engine.repository("east")

    def packs() -> dict[str, ObjectInfo]:
        return {i.name: i for i in repo.vault.list("packs/")}

    old = engine.backup(add(east, "old", tmp_path, (1, 2), backup="1-7").id)
    old_packs = set(packs())
    gone = engine.backup(add(east, "gone", tmp_path, (9,), backup="1-7").id)
    gone_packs = set(packs()) - old_packs
    assert old_packs and gone_packs
    assert all(i.retain_until is None for i in packs().values())
    # a newer point, locked by its policy, uses every chunk of "old" and adds its own
    newer = engine.backup(add(east, "new", tmp_path, (1, 2, 3), **LOCK_30D).id)
    until = repo.point_object(newer.id).retain_until
    assert until is not None

    repo.forget([old.id, gone.id])
    before = set(i.name for i in repo.vault.list("index/"))
    report = repo.prune()
    after = packs()
    # the packs the locked point shares with older data: their lock grew to the point's, and
    # prune deleted none of them; what "gone" alone used went
    assert old_packs <= set(after)
    assert all(after[n].retain_until == until for n in old_packs)
    assert gone_packs.isdisjoint(after) and report.packs_deleted == len(gone_packs)
    # the superseded index objects the point's commit locked stay until their lock ends
    assert report.skipped and all(p.object.startswith("index/") for p in report.skipped)
    # the index prune wrote maps the locked point's chunks: it is locked as long as the point
    # (without the extension it would carry no lock at all)
    written = [i for i in repo.vault.list("index/") if i.name not in before]
    assert report.indexes_written == len(written) >= 1
    assert all(i.retain_until == until for i in written)
    assert all(i.retention_mode is RetentionMode.COMPLIANCE for i in written)
    assert report.locks_extended == len(written)
    # the locked point is whole in what is left
    assert repo.verify(read_data=True).ok
    assert [p.id for p in repo.points()] == [newer.id]


def test_prune_gives_shared_objects_the_latest_lock_and_every_hold_in_the_mode_asked(
    engine: Engine, tmp_path: Path
) -> None:
    """A point held (no lock) and a point governance-locked, sharing data: what prune writes
    for them is held and governance-locked; a hold asks no mode, so nothing turns
    compliance."""
    east = engine.region("east")
    repo = engine.repository("east")
    held = engine.backup(add(east, "held", tmp_path, (1,), backup="1-7").id)
    hold_point(repo, held.id)
    locked = engine.backup(add(east, "locked", tmp_path, (1, 2), backup="1-7").id)
    until = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    lock_point(repo, locked.id, until, RetentionMode.GOVERNANCE)
    gone = engine.backup(add(east, "gone", tmp_path, (9,), backup="1-7").id)
    before = {i.name for i in repo.vault.list("index/")}
    repo.forget([gone.id])
    report = repo.prune()
    written = [i for i in repo.vault.list("index/") if i.name not in before]
    assert written and report.locks_extended >= len(written)
    for info in written:
        assert info.legal_hold
        assert (info.retain_until, info.retention_mode) == (until, RetentionMode.GOVERNANCE)


def test_prune_does_not_extend_the_index_objects_it_replaces(
    engine: Engine, tmp_path: Path
) -> None:
    # review LOW 6: prune extended the superseded index objects up to the newest lock of a
    # point using their packs, then could not delete them
    east = engine.region("east")
    repo = engine.repository("east")
    later = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
    soon = later - timedelta(days=18)
    point = engine.backup(add(east, "point", tmp_path, (1,), backup="1-7").id)
    lock_point(repo, point.id, later, RetentionMode.GOVERNANCE)
    gone = engine.backup(add(east, "gone", tmp_path, (9,), backup="1-7").id)
    # the point's index object carries a shorter lock than the point (an administrator's
    # bypass, or a lock the point's own grew past)
    before = [i.name for i in repo.vault.list("index/") if i.retain_until == later]
    assert before
    for name in before:
        repo.vault.set_retention(name, soon, RetentionMode.GOVERNANCE, bypass_governance=True)
    repo.forget([gone.id])
    report = repo.prune()
    left = {i.name: i for i in repo.vault.list("index/")}
    assert all(left[name].retain_until == soon for name in before if name in left)
    written = [i for name, i in left.items() if name not in before]
    assert written and all(i.retain_until == later for i in written)
    assert report.indexes_written == len(written)
    assert repo.verify(read_data=True).ok


# --------------------------------------------------------------------------- by hand


def test_release_takes_the_exclusive_lock(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # review MEDIUM 4: under a shared lock, a point committed (and held) while a release ran
    # found the shared objects held, skipped them, and the release then lifted their hold
    east = engine.region("east")
    repo = engine.repository("east")
    first = engine.backup(add(east, "a", tmp_path, (1,), backup="1-7").id)
    second = engine.backup(add(east, "b", tmp_path, (1,), backup="1-7").id)
    hold_point(repo, first.id)
    other = Repository.open(
        repo.vault,
        repo.keys,
        region=repo.region,
        settings=dataclasses.replace(SETTINGS, lock_wait=timedelta(0)),
    )
    seen: list[str] = []
    release = retention_module.release

    def racing(*args: Any, **kwargs: Any) -> Any:
        # a writer (a backup's commit and its policy hold) while the release runs
        try:
            other.protect(second.id, legal_hold=True)
        except LockedError as exc:
            seen.append(str(exc))
        return release(*args, **kwargs)

    monkeypatch.setattr(retention_module, "release", racing)
    release_point(repo, first.id)
    assert len(seen) == 1 and "release" in seen[0]
    assert not repo.point_object(first.id).legal_hold


def test_a_compliance_lock_cannot_be_shortened_nor_made_governance(
    engine: Engine, site_path: Path, tmp_path: Path
) -> None:
    east = engine.region("east")
    point = engine.backup(add(east, "hlr", tmp_path, (1,), backup="1-7").id)
    repo = engine.repository("east")
    far = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
    locked = cli(
        site_path,
        "lock",
        point.id[:8],
        "--until",
        far.isoformat(),
        "--mode",
        "compliance",
        "--json",
    )
    assert locked.exit_code == 0, locked.stderr
    out = json.loads(locked.stdout)
    assert (out["retain_until"], out["mode"]) == (far.isoformat(), "compliance")
    assert repo.point_object(point.id).retain_until == far

    nearer = far - timedelta(days=10)
    with pytest.raises(LockRefused, match="can never be shortened"):
        lock_point(repo, point.id, nearer, RetentionMode.COMPLIANCE)
    with pytest.raises(LockRefused, match="cannot become governance"):
        lock_point(repo, point.id, far + timedelta(days=1), RetentionMode.GOVERNANCE)
    # the vault itself refuses too
    with pytest.raises(RetentionLocked, match="can only be extended"):
        repo.vault.set_retention(f"points/{point.id}", nearer, RetentionMode.COMPLIANCE)
    shorter = cli(
        site_path, "lock", point.id, "--until", nearer.isoformat(), "--mode", "compliance"
    )
    assert shorter.exit_code == 1
    assert far.isoformat() in shorter.stderr and "can never be shortened" in shorter.stderr
    released = cli(site_path, "release", point.id, "--bypass-governance")
    assert released.exit_code == 1
    assert f"compliance lock until {far.isoformat()}" in released.stderr
    assert repo.point_object(point.id).retain_until == far  # nothing changed

    # extending is fine
    longer = cli(site_path, "lock", point.id, "--for", "4w", "--mode", "compliance")
    assert longer.exit_code == 0, longer.stderr
    assert repo.point_object(point.id).retain_until > far  # type: ignore[operator]


def test_hold_then_release_keeps_what_another_held_point_shares(
    engine: Engine, site_path: Path, tmp_path: Path
) -> None:
    east = engine.region("east")
    first = engine.backup(add(east, "a", tmp_path, (1,), backup="1-7").id)
    second = engine.backup(add(east, "b", tmp_path, (1, 2), backup="1-7").id)
    repo = engine.repository("east")

    def held() -> set[str]:
        return {
            i.name
            for prefix in ("packs/", "index/", "points/")
            for i in repo.vault.list(prefix)
            if i.legal_hold
        }

    first_held = cli(site_path, "hold", first.id[:10], "--json")
    assert first_held.exit_code == 0, first_held.stderr
    assert json.loads(first_held.stdout)["legal_hold"] is True
    by_first = held()
    assert f"points/{first.id}" in by_first and any(n.startswith("packs/") for n in by_first)
    assert cli(site_path, "hold", second.id).exit_code == 0
    by_both = held()
    assert by_first < by_both
    refused = cli(site_path, "forget", second.id)
    assert refused.exit_code == 1 and "legal hold" in refused.stderr

    released = cli(site_path, "release", second.id, "--json")
    assert released.exit_code == 0, released.stderr
    out = json.loads(released.stdout)
    assert out["legal_hold"] is False and out["objects_kept_for_other_points"] >= 1
    # what the first point uses stays held, exactly; what only the second used is free
    assert held() == by_first
    again = cli(site_path, "release", second.id)
    assert again.exit_code == 1 and "no legal hold to release" in again.stderr
    forgot = cli(site_path, "forget", second.id, "--json")
    assert forgot.exit_code == 0, forgot.stderr
    assert json.loads(forgot.stdout)["forgotten"] == second.id
    report = repo.prune()
    assert report.packs_deleted >= 1  # the second point's own data went
    assert {p.object for p in report.skipped} <= by_first
    assert repo.verify(read_data=True).ok


def test_a_governance_lock_is_lifted_only_with_bypass_governance(
    engine: Engine, site_path: Path, tmp_path: Path
) -> None:
    east = engine.region("east")
    point = engine.backup(add(east, "hlr", tmp_path, (1,), backup="1-7").id)
    repo = engine.repository("east")
    assert cli(site_path, "lock", point.id, "--for", "3d").exit_code == 0
    info = repo.point_object(point.id)
    assert info.retention_mode is RetentionMode.GOVERNANCE
    refused = cli(site_path, "release", point.id)
    assert refused.exit_code == 1 and "--bypass-governance" in refused.stderr
    assert cli(site_path, "forget", point.id).exit_code == 1

    released = release_point(repo, point.id, bypass_governance=True)
    assert f"points/{point.id}" in released.released
    info = repo.point_object(point.id)
    assert info.retain_until is not None and info.retain_until <= datetime.now(UTC)
    assert cli(site_path, "forget", point.id).exit_code == 0


def test_cli_errors_name_what_is_wrong(engine: Engine, site_path: Path, tmp_path: Path) -> None:
    east = engine.region("east")
    point = engine.backup(add(east, "hlr", tmp_path, (1,), backup="1-7").id)
    unknown = cli(site_path, "lock", "abcdef123456", "--for", "1d")
    assert unknown.exit_code == 1 and "no recovery point 'abcdef123456'" in unknown.stderr
    both = cli(site_path, "lock", point.id, "--for", "1d", "--until", "2030-01-01")
    assert both.exit_code == 2
    bad = cli(site_path, "lock", point.id, "--for", "soon")
    assert bad.exit_code == 2 and "not a duration" in bad.stderr
    past = cli(site_path, "lock", point.id, "--until", "2020-01-01")
    assert past.exit_code == 1 and "has passed" in past.stderr
