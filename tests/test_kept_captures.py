"""Kept captures of incremental block backups, the review 15a findings as regression tests:
state files named by a hash (long ARM ids), pending entries nobody can judge settled after
an age limit, current captures released when no backup follows them, an intent recorded
before the provider captures, a damaged manifest that stops no backup, one listing of the
manifests per tick, and a block provider written before ``since``/``keep``."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import image_provider
import pytest
from image_provider import ImageCompute
from regionvault.core import Site
from regionvault.core.interfaces import Capture
from regionvault.core.pipeline import engine as engine_module
from regionvault.core.pipeline.engine import Engine
from regionvault.core.pipeline.jobs import job_key
from regionvault.core.pipeline.state import DrillRecord, KeptCapture, StateStore
from regionvault.core.procs import ProcessIdentity
from regionvault.core.repository import Repository
from regionvault.core.types import CaptureKind
from site_support import open_site, site_toml
from test_incremental_blocks import compute_of, restore_bytes, snapshots, write_at

EAST = "imagefake:east"
ARM_ID = (
    "/subscriptions/12345678-1234-1234-1234-123456789012/resourceGroups/"
    "rg-prod-5g-core-network-functions-westeurope-01/providers/Microsoft.Compute/"
    "virtualMachines/vm-ims-cscf-primary-westeurope-zone1-001"
)


@pytest.fixture
def image_site(tmp_path: Path) -> Iterator[Site]:
    path = tmp_path / "site.toml"
    path.write_text(
        site_toml(
            {"imagefake:east": "east"}, settings={"state_dir": tmp_path / "state"}, replicate=None
        )
    )
    with open_site(path, image_provider) as site:
        yield site


def other_host_owner(at_pid: int | None = None) -> str:
    """The token of a run on another host (a restarted container gets a new host name):
    nobody here can tell whether it still runs."""
    me = ProcessIdentity.current()
    return replace(me, host="gone-container", pid=at_pid or me.pid).token()


# -- 1: names ------------------------------------------------------------------------------


def test_state_of_an_azure_vm_with_a_long_arm_id(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    with state.kept_captures("azure:westeurope", ARM_ID) as kept:
        kept.pending.append(KeptCapture('{"snap":"x"}', "ab" * 16, "owner"))
    assert state.kept_instances("azure:westeurope") == [ARM_ID]
    with state.kept_captures("azure:westeurope", ARM_ID) as kept:
        assert [p.ref for p in kept.pending] == ['{"snap":"x"}']
    record = DrillRecord("azure:westeurope", ARM_ID, "cd" * 16, "vm-new", _now(), True, 12.5)
    state.record_drill(record)
    assert state.last_drill("azure:westeurope", ARM_ID) == record


def test_state_written_under_the_old_names_is_still_read(tmp_path: Path) -> None:
    """Drill records and kept captures written before names were hashed: read (and moved,
    for kept captures, so that their snapshots are still released)."""
    old = job_key("drill", "local:east", "vm/1").replace("/", "__")
    (tmp_path / "drills").mkdir()
    record = DrillRecord("local:east", "vm/1", "ef" * 16, "vm-2", _now(), False, None)
    (tmp_path / "drills" / f"{old}.json").write_text(json.dumps(record.to_dict()))
    old_kept = job_key("kept", "local:east", "vm/1").replace("/", "__")
    (tmp_path / "captures").mkdir()
    doc = {"current": {"ref": "r1", "point_id": "p1"}, "pending": [], "release": ["r0"]}
    doc |= {"region": "local:east", "instance_id": "vm/1"}
    (tmp_path / "captures" / f"{old_kept}.json").write_text(json.dumps(doc))

    state = StateStore(tmp_path)
    assert state.last_drill("local:east", "vm/1") == record
    assert state.kept_instances("local:east") == ["vm/1"]
    with state.kept_captures("local:east", "vm/1") as kept:
        assert kept.current is not None and kept.current.ref == "r1"
        assert kept.release == ["r0"]
    assert not (tmp_path / "captures" / f"{old_kept}.json").exists()
    newer = replace(record, healthy=True, rto_seconds=3.0)
    state.record_drill(newer)
    assert state.last_drill("local:east", "vm/1") == newer
    assert not (tmp_path / "drills" / f"{old}.json").exists()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


# -- 2a: pending entries nobody can judge; a daemon's own failed step -----------------------


def _leak(engine: Engine, compute: ImageCompute, instance_id: str, owner: str, at: float) -> Any:
    leaked = compute.capture(instance_id, keep=True)
    leaked.close()
    assert leaked.ref is not None
    with engine.state.kept_captures(EAST, instance_id) as kept:
        kept.pending.append(KeptCapture(leaked.ref, Repository.new_point_id(), owner, at))
    return leaked


def test_pending_of_another_host_is_released_once_older_than_the_limit(image_site: Site) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("smf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(12).randbytes(100_000))
    engine = Engine(image_site, kept_pending_limit=timedelta(hours=1))
    engine.backup(inst.id)
    old = _leak(engine, compute, inst.id, other_host_owner(), time.time() - 7200)
    young = _leak(engine, compute, inst.id, other_host_owner(), time.time() - 60)
    engine.retain(EAST)
    assert not old.snapshot.exists(), "pending of a gone container never released"
    assert young.snapshot.exists(), "a run elsewhere may still read it: it waits"
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert [p.ref for p in kept.pending] == [young.ref]


def test_an_entry_without_a_time_waits_the_limit_from_when_it_is_first_seen(
    image_site: Site,
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("smf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(3).randbytes(10_000))
    engine = Engine(image_site, kept_pending_limit=timedelta(hours=1))
    engine.backup(inst.id)
    legacy = _leak(engine, compute, inst.id, other_host_owner(), 0.0)  # written before `at`
    engine.retain(EAST)
    assert legacy.snapshot.exists()
    with engine.state.kept_captures(EAST, inst.id) as kept:
        (entry,) = kept.pending
        assert time.time() - entry.at < 60
        kept.pending = [replace(entry, at=entry.at - 7200)]
    engine.retain(EAST)
    assert not legacy.snapshot.exists()


def test_committed_pending_of_another_host_becomes_current(
    image_site: Site, tmp_path: Path
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("upf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(11).randbytes(50_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None
        # committed, then its container was killed before it said so
        kept.pending.append(replace(kept.current, owner=other_host_owner(), at=time.time()))
        kept.current = None
    engine.retain(EAST)
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None and not kept.pending and not kept.release
    write_at(compute, inst.id, 7, b"7")
    point = engine.backup(inst.id)
    assert compute.captures[-1].changed_ranges() is not None  # taken since it
    assert restore_bytes(engine, point.id, tmp_path) == compute.image(inst.id).read_bytes()
    assert len(snapshots(compute)) == 1


def test_a_daemons_own_failed_keep_current_is_settled_on_its_next_tick(
    image_site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("amf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(4).randbytes(50_000))
    engine = Engine(image_site)
    first_point = engine.backup(inst.id)
    first = snapshots(compute)

    def fail(*args: object) -> None:
        raise OSError("state directory full")

    monkeypatch.setattr(engine, "_keep_current", fail)
    second_point = engine.backup(inst.id)
    monkeypatch.undo()
    assert "not recorded as current" in caplog.text
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None and kept.current.point_id == first_point.id
        assert len(kept.pending) == 1  # owned by this process, which is alive
    engine.retain(EAST)  # the daemon's next tick
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None and kept.current.point_id == second_point.id
        assert not kept.pending and not kept.release
    assert len(snapshots(compute)) == 1 and not first & snapshots(compute)


# -- 2b: current captures that no backup will follow --------------------------------------


@pytest.mark.parametrize("why", ["terminated", "opted out", "points forgotten", "expired"])
def test_the_current_capture_goes_when_no_backup_follows_it(image_site: Site, why: str) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("amf", 1 << 20, {"backup": "1-7"})
    keep = compute.make_instance("keep", 1 << 20, {"backup": "1-7"})
    for n, i in enumerate((inst, keep)):
        write_at(compute, i.id, 0, random.Random(n).randbytes(100_000))
    clock = [_now()]
    engine = Engine(image_site, clock=lambda: clock[0])
    point = engine.backup(inst.id)
    engine.backup(keep.id)
    kept_of_keep = snapshots(compute) - {p for p in snapshots(compute) if inst.id in p}
    if why == "terminated":
        compute.terminate(inst.id)
    elif why == "opted out":
        compute.set_tags(inst.id, {image_site.config.tag_key: "none"})
    elif why == "points forgotten":
        engine.repository(EAST).forget([point.id])
    else:
        clock[0] += timedelta(days=8)
        engine.backup(keep.id)  # kept current by its fresh backup
        kept_of_keep = {p for p in snapshots(compute) if keep.id in p}
    engine.retain(EAST)
    assert snapshots(compute) == kept_of_keep, "the other instance's capture stays"
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.empty()


# -- 3: killed while the provider captures --------------------------------------------------

_KILLED_IN_CAPTURE = """
import os, signal, sys
sys.path[:0] = {paths!r}
import image_provider
from site_support import open_site
from regionvault.core.pipeline.engine import Engine
real = image_provider.ImageCompute.capture
def capture(self, instance_id, *, kind=None, since=None, keep=False):
    real(self, instance_id, kind=kind, since=since, keep=keep)  # its snapshot is made
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the capture returns
image_provider.ImageCompute.capture = capture
with open_site(__import__("pathlib").Path({site!r}), image_provider) as site:
    Engine(site).backup({instance!r})
"""


def test_a_run_killed_while_its_provider_captures_is_on_record_and_warned_about(
    image_site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("vcu", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(10).randbytes(200_000))
    engine = Engine(image_site)
    engine.backup(inst.id)
    script = _KILLED_IN_CAPTURE.format(
        paths=[str(Path(__file__).parent)], site=str(tmp_path / "site.toml"), instance=inst.id
    )
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], timeout=120)
    assert proc.returncode == -9
    with engine.state.kept_captures(EAST, inst.id) as kept:
        (intent,) = kept.pending
        assert intent.ref is None and intent.at > 0 and intent.owner
    untracked = len(snapshots(compute)) - 1
    assert untracked == 1
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # bounded: two more backups and ticks
            engine.backup(inst.id)
            engine.retain(EAST)
    warnings = [r.getMessage() for r in caplog.records if "stopped while its provider" in r.message]
    assert len(warnings) == 1, warnings
    assert inst.id in warnings[0] and intent.point_id in warnings[0]
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert not kept.pending and not kept.release
    # what the provider made in that window is the operator's to sweep (docs/jobs.md)
    assert len(snapshots(compute)) == 1 + untracked


def test_a_failed_capture_leaves_no_intent(
    image_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = compute_of(image_site)
    inst = compute.make_instance("vcu", 1 << 20)
    engine = Engine(image_site)

    def refuse(*args: object, **kwargs: object) -> Capture:
        raise OSError("snapshot quota exceeded")

    monkeypatch.setattr(compute, "capture", refuse)
    with pytest.raises(OSError, match="quota"):
        engine.backup(inst.id)
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.empty()


# -- 5: a damaged manifest ----------------------------------------------------------------


@pytest.mark.parametrize("slotted", [False, True])
def test_a_damaged_manifest_of_another_instance_stops_no_backup(
    image_site: Site, caplog: pytest.LogCaptureFixture, slotted: bool
) -> None:
    compute = compute_of(image_site)
    a = compute.make_instance("a", 1 << 20)
    b = compute.make_instance("b", 1 << 20)
    write_at(compute, a.id, 0, random.Random(1).randbytes(1000))
    write_at(compute, b.id, 0, random.Random(2).randbytes(1000))
    engine = Engine(image_site)
    pa = engine.backup(a.id)
    engine.backup(b.id)
    vault = engine.repository(EAST).vault
    name = f"points/{pa.id}"
    blob = bytearray(vault.get(name))
    blob[-5] ^= 1  # one flipped bit in instance a's manifest
    vault.put(name, bytes(blob))
    point = engine.backup(b.id, slot=_now() if slotted else None)
    assert compute.captures[-1].changed_ranges() is not None  # still incremental
    assert pa.id in caplog.text  # the damaged one is named
    assert engine.backup(b.id, slot=_now()).id == point.id if slotted else True


# -- 7: one listing per tick ----------------------------------------------------------------


def test_a_tick_lists_the_manifests_once_for_all_kept_captures(image_site: Site) -> None:
    compute = compute_of(image_site)
    engine = Engine(image_site)
    for n in range(8):
        inst = compute.make_instance(f"n{n}", 256 << 10)
        write_at(compute, inst.id, 0, random.Random(n).randbytes(1000))
        engine.backup(inst.id)
    vault = engine.repository(EAST).vault
    gets: list[str] = []
    real = vault.get

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("points/"):
            gets.append(name)
        return real(name, *args, **kwargs)

    vault.get = counting  # type: ignore[method-assign]
    assert engine.release_kept_captures(EAST) == 0
    assert len(gets) == 8, f"{len(gets)} manifest reads to settle 8 instances"


def test_a_tick_with_no_kept_captures_reads_no_manifest(image_site: Site) -> None:
    compute = compute_of(image_site)
    engine = Engine(image_site)
    inst = compute.make_instance("gone", 256 << 10)
    engine.backup(inst.id)
    compute.terminate(inst.id)
    engine.release_kept_captures(EAST)  # releases its capture: nothing kept any more
    vault = engine.repository(EAST).vault
    gets: list[str] = []
    real = vault.get

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        gets.append(name)
        return real(name, *args, **kwargs)

    vault.get = counting  # type: ignore[method-assign]
    engine.release_kept_captures(EAST)
    assert not [g for g in gets if g.startswith("points/")]


# -- 8: a block provider written before since/keep -------------------------------------------


class OldImageCompute(ImageCompute):
    """A block provider as written before ``since``/``keep`` and ``disks=``."""

    def capture(self, instance_id: str, *, kind: CaptureKind | None = None) -> Capture:  # type: ignore[override]
        return super().capture(instance_id, kind=kind)

    def open_restore_sink(  # type: ignore[override]
        self, spec: Any, kind: CaptureKind, *, size: int | None = None
    ) -> Any:
        return super().open_restore_sink(spec, kind, size=size)


def test_a_block_provider_written_before_keep_and_since(
    image_site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    compute = compute_of(image_site)
    compute.__class__ = OldImageCompute
    inst = compute.make_instance("old", 256 << 10)
    write_at(compute, inst.id, 0, random.Random(1).randbytes(1000))
    engine = Engine(image_site)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            point = engine.backup(inst.id)
    warnings = [r.getMessage() for r in caplog.records if "takes no since/keep" in r.message]
    assert len(warnings) == 1 and "OldImageCompute" in warnings[0], warnings
    assert compute.captures[-1].ref is None and not snapshots(compute)
    result = engine.restore(point.id, region=EAST, launch=True)
    assert result.instance is not None
    launched = compute.image(result.instance.id).read_bytes()
    assert launched == compute.image(inst.id).read_bytes()


# -- review rcq #1: two runs of one slot (ids fixed by the slot) ---------------------------


def test_two_runs_of_one_slot_keep_one_capture_and_never_swap_bases(
    image_site: Site, tmp_path: Path
) -> None:
    """Run A is paused inside its capture while run B backs the same slot up: one point, B's
    capture current, A's released; a tick between them leaves A's pending entry alone (its
    point id is B's point's, but B's run made it); and an entry of a dead run whose point
    id another run committed is released, never made the base of that point."""
    slot = datetime(2026, 12, 7, tzinfo=UTC)
    compute = compute_of(image_site)
    inst = compute.make_instance("smf", 1 << 20)
    write_at(compute, inst.id, 0, random.Random(12).randbytes(50_000))
    engine = Engine(image_site)
    real = compute.capture
    paused: list[str] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        if not paused:
            paused.append("a")
            b = engine.backup(inst.id, slot=slot)
            paused.append(b.id)
            engine.retain(EAST)  # a tick while A is paused
            with engine.state.kept_captures(EAST, inst.id) as kept:
                assert kept.current is not None and kept.current.point_id == b.id
                (a_entry,) = kept.pending  # A's intent, left alone
                assert a_entry.ref is None and a_entry.point_id == b.id
        return real(*args, **kwargs)

    compute.capture = capture  # type: ignore[method-assign]
    a = engine.backup(inst.id, slot=slot)
    (b_id,) = paused[1:]
    assert a.id == b_id
    (point,) = engine.points(EAST, inst.id)
    assert point.tags[engine_module.RUN_TAG]
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None and kept.current.point_id == b_id
        b_ref = kept.current.ref
        assert not kept.pending and not kept.release
        # a dead run of another host whose point id B's run committed
        kept.pending.append(
            KeptCapture(
                "snap-of-a-dead-run", b_id, other_host_owner(), time.time() - 7 * 86400, run="dead"
            )
        )
    assert len(snapshots(compute)) == 1
    engine.retain(EAST)
    with engine.state.kept_captures(EAST, inst.id) as kept:
        assert kept.current is not None and kept.current.ref == b_ref
        assert not kept.pending
