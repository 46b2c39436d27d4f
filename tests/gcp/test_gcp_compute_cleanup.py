"""What GceCompute leaves behind when a capture or a restore fails or its process dies: no
cleanup while a create is in flight, a create whose answer was lost, throttling and login
failures, and the sweep of what a dead process left (review rgce, findings 1-5 and 8).

The fake runs operations whether or not anyone polls them, as GCE does, and
``GceWorld.leftovers`` lets every operation end before it looks.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="the GCP tests need pip install -e '.[test]'")

from gce_world import WORKER, GceWorld, gce_world
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from regionvault.core.errors import ComputeError, InstanceNotFound, TransientError
from regionvault.core.procs import ProcessIdentity, boot_id, machine_tag, pid_namespace, start_ticks
from regionvault.core.types import CaptureKind, Disk, LaunchSpec, Tags
from regionvault.providers.gcp.compute import (
    CAPTURE_LABEL,
    KEEP_LABEL,
    OWNER_LABEL,
    RESTORE_LABEL,
    WORKER_LABEL,
    GceBlockSink,
    GceClients,
)

CLEAN = {"snapshots": [], "disks": [], "worker disks": [], "devices": []}


@pytest.fixture
def gce(tmp_path: Path) -> Iterator[GceWorld]:
    with gce_world(tmp_path) as world:
        yield world


# --------------------------------------------------------------------------- in flight


def test_a_failed_snapshot_waits_for_the_others_before_cleanup(tmp_path: Path) -> None:
    """The first snapshot's operation fails while the second is still running: the cleanup
    waits for the second and deletes what it made (it once deleted nothing, and GCE made
    the snapshot afterwards)."""
    with gce_world(tmp_path, operation_polls=10) as world:
        compute = world.compute()
        vm = world.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
        # the refusal ends the first operation at once; the second snapshot takes longer
        world.fake.fail_next_operation(
            "disks.createSnapshot", "QUOTA_EXCEEDED", status=403, steps=1
        )
        with pytest.raises(ComputeError, match="QUOTA_EXCEEDED"):
            compute.capture(vm)
        assert world.fake.pending_operations() == []
        assert world.leftovers() == CLEAN


def test_a_refused_insert_waits_for_the_inserts_begun(tmp_path: Path) -> None:
    """The second disk's insert is refused outright: the first insert, still running, is
    waited for and its disk deleted (a delete while it was being made was a 400
    resourceNotReady, taken as permanent: the disk stayed)."""
    with gce_world(tmp_path, operation_polls=3) as world:
        compute = world.compute()
        vm = world.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
        world.fake.fail_next("disks.insert", 400, reason="invalid", skip=1)
        with pytest.raises(ComputeError, match="HTTP 400 invalid"):
            compute.capture(vm)
        assert world.fake.pending_operations() == []
        assert world.leftovers() == CLEAN


def test_a_restore_whose_insert_is_refused_leaves_nothing(tmp_path: Path) -> None:
    with gce_world(tmp_path, operation_polls=3) as world:
        compute = world.compute()
        spec = LaunchSpec(name="vdu-1", tags=Tags({"backup": "1-7"}))
        world.fake.fail_next("disks.insert", 400, reason="invalid", skip=1)
        disks = [("boot", 0, 10 << 30), ("data", 10 << 30, 10 << 30)]
        with pytest.raises(ComputeError, match="HTTP 400 invalid"):
            compute.open_restore_sink(
                spec, CaptureKind.BLOCKS, size=20 << 30, disks=[Disk(*d) for d in disks]
            )
        assert world.fake.pending_operations() == []
        assert world.leftovers() == CLEAN


def test_a_snapshot_whose_answer_was_lost_is_deleted(gce: GceWorld) -> None:
    """createSnapshot reached GCE, its answer was lost and every retry failed: the snapshot
    exists, and the cleanup deletes it (it was skipped, as never made)."""
    compute = gce.compute(sdk_retries=2)
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000])
    gce.fake.fail_next("disks.createSnapshot", lose_answer=True)
    gce.fake.fail_next("disks.createSnapshot", count=2)
    with pytest.raises(TransientError, match="cannot snapshot disk"):
        compute.capture(vm)
    assert gce.leftovers() == CLEAN


def test_a_snapshot_whose_answer_was_lost_is_deleted_when_operations_end_at_once(
    tmp_path: Path,
) -> None:
    with gce_world(tmp_path, operation_polls=0) as world:
        compute = world.compute(sdk_retries=2)
        vm = world.seed("vcu-0", disks=[b"boot" * 1000])
        world.fake.fail_next("disks.createSnapshot", lose_answer=True)
        world.fake.fail_next("disks.createSnapshot", count=2)
        with pytest.raises(TransientError):
            compute.capture(vm)
        assert world.leftovers() == CLEAN


# --------------------------------------------------------------------------- throttling


@pytest.mark.parametrize("reason", ["rateLimitExceeded", "userRateLimitExceeded"])
def test_a_rate_limit_403_is_retried(gce: GceWorld, reason: str) -> None:
    compute = gce.compute(sdk_retries=3)
    vm = gce.seed("vcu-0")
    gce.fake.fail_next("instances.get", 403, reason=reason, message="Rate Limit Exceeded")
    assert compute.get_instance(vm).id == vm
    assert gce.fake.counts["instances.get"] == 2


def test_a_rate_limit_403_is_transient_and_asks_for_a_minute(gce: GceWorld) -> None:
    compute = gce.compute(sdk_retries=0)
    compute.rate_limit_pause = 60.0  # the default (the world makes it 0)
    vm = gce.seed("vcu-0")
    gce.fake.fail_next("instances.get", 403, reason="rateLimitExceeded")
    with pytest.raises(TransientError, match="HTTP 403 rateLimitExceeded") as throttled:
        compute.get_instance(vm)
    assert throttled.value.retry_after == 60.0


def test_a_resource_not_ready_is_transient(gce: GceWorld) -> None:
    compute = gce.compute(sdk_retries=0)
    gce.fake.fail_next("disks.delete", 400, reason="resourceNotReady", message="is not ready")
    with pytest.raises(TransientError, match="resourceNotReady"):
        compute.delete_disk("rv-worker-0")


def test_other_403s_stay_permanent(gce: GceWorld) -> None:
    compute = gce.compute(sdk_retries=3)
    vm = gce.seed("vcu-0")
    gce.fake.fail_next("instances.get", 403, reason="forbidden", message="Required permission")
    with pytest.raises(ComputeError, match="HTTP 403 forbidden") as refused:
        compute.get_instance(vm)
    assert not isinstance(refused.value, TransientError)
    assert gce.fake.counts["instances.get"] == 1


# --------------------------------------------------------------------------- login failures


class _FailingLogin(AnonymousCredentials):
    """Credentials whose token refresh fails (``error``) for the first request to a URL
    holding ``trigger`` and the ``times - 1`` requests after it."""

    def __init__(self, trigger: str, times: int, error: Exception) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.trigger, self.times, self.error, self.left = trigger, times, error, -1

    def before_request(self, request: Any, method: Any, url: str, headers: Any) -> None:
        if self.left < 0 and self.trigger in url:
            self.left = self.times
        if self.left > 0:
            self.left -= 1
            raise self.error


def test_no_answer_from_the_token_endpoint_is_transient_and_cleaned_up(gce: GceWorld) -> None:
    compute = gce.compute(sdk_retries=2)
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
    error = auth_exceptions.TransportError("metadata server: connection reset")
    compute.clients = GceClients.build(compute.settings, _FailingLogin("attachDisk", 3, error))
    with pytest.raises(TransientError, match="no answer from the token endpoint"):
        compute.capture(vm)
    assert gce.leftovers() == CLEAN


def test_a_refused_login_is_a_compute_error_and_cleaned_up(gce: GceWorld) -> None:
    compute = gce.compute(sdk_retries=2)
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
    error = auth_exceptions.RefreshError("invalid_grant: token revoked")
    compute.clients = GceClients.build(compute.settings, _FailingLogin("attachDisk", 1, error))
    with pytest.raises(ComputeError, match="login failed") as refused:
        compute.capture(vm)
    assert not isinstance(refused.value, TransientError)
    assert gce.leftovers() == CLEAN


def test_cleanup_goes_on_after_any_error(gce: GceWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    compute = gce.compute()
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
    capture = compute.capture(vm)
    real = compute.delete_disk
    first = capture.parts[0].disk  # type: ignore[attr-defined]

    def delete_disk(disk: str) -> None:
        if disk == first:
            raise RuntimeError("a bug")
        real(disk)

    monkeypatch.setattr(compute, "delete_disk", delete_disk)
    with pytest.raises(ComputeError, match="RuntimeError: a bug"):
        capture.close()
    # everything else went: the other disk, both snapshots, both devices
    assert gce.leftovers() == {**CLEAN, "disks": [first]}


# --------------------------------------------------------------------------- the sweep


def _dead_owner() -> ProcessIdentity:
    """A process of this host and boot killed with SIGKILL: its identity."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        ticks = start_ticks(child.pid)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.stdin is not None
        child.stdin.close()
    return ProcessIdentity(
        socket.gethostname(), child.pid, ticks, boot_id(), pid_namespace(), machine_tag()
    )


def _labels(world: GceWorld) -> dict[str, dict[str, str]]:
    fake = world.fake
    return {
        **{f"disk {d}": fake.disk_labels(d) for d in fake.disk_names()},
        **{f"snapshot {s}": fake.snapshot_labels(s) for s in fake.snapshot_names()},
    }


def test_a_capture_killed_midway_is_swept_by_the_next(
    gce: GceWorld, caplog: pytest.LogCaptureFixture
) -> None:
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000, b"data" * 1000])
    dead = gce.compute()
    dead.owner = _dead_owner()
    abandoned = dead.capture(vm)  # the process is killed here: close never runs
    left = gce.leftovers()
    assert len(left["snapshots"]) == 2 and len(left["disks"]) == 2
    assert len(left["devices"]) == 2
    for name, labels in _labels(gce).items():
        if CAPTURE_LABEL in labels:
            assert labels[OWNER_LABEL] == dead.owner.token(), name
            assert labels[WORKER_LABEL] == WORKER
    rerun = gce.compute()
    logger = "regionvault.providers.gcp.compute"
    with caplog.at_level(logging.INFO, logger=logger), rerun.capture(vm) as capture:
        assert b"data" * 1000 in b"".join(d for _o, d in capture.blocks())
    assert gce.leftovers() == CLEAN
    swept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweep:")]
    assert len(swept) == 6, swept  # two devices, two disks, two snapshots
    assert all(d in " ".join(swept) for d in abandoned.snapshot_names)  # type: ignore[attr-defined]


def test_a_restore_killed_midway_is_swept_by_the_next(gce: GceWorld) -> None:
    spec = LaunchSpec(name="vdu-9", tags=Tags({"backup": "1-7"}))
    dead = gce.compute()
    dead.owner = _dead_owner()
    sink = dead.open_restore_sink(spec, CaptureKind.BLOCKS, size=2 << 20)
    sink.write(0, b"x" * (1 << 20))  # killed here
    assert isinstance(sink, GceBlockSink)
    # the disks name the instance their launch makes
    assert gce.fake.disk_labels(sink.disk_names[0])[RESTORE_LABEL] == "vdu-9"
    rerun = gce.compute()
    again = rerun.open_restore_sink(spec, CaptureKind.BLOCKS, size=2 << 20)
    assert gce.leftovers()["disks"] == again.disk_names  # type: ignore[attr-defined]
    again.write(0, b"y" * (1 << 20))
    again.commit()
    launched = rerun.launch(spec, again)
    assert launched.id == "vdu-9"
    own = again.disk_names  # type: ignore[attr-defined]
    assert gce.leftovers() == {**CLEAN, "disks": own}  # the launched instance's disk only
    # a later sweep leaves the launched instance's disks alone, whoever their owner was
    for name in own:
        gce.fake.set_disk_labels(
            name, {**gce.fake.disk_labels(name), OWNER_LABEL: dead.owner.token()}
        )
    assert rerun.sweep() == []
    assert gce.fake.instance("vdu-9")["disks"][0]["source"].endswith(own[0])


def test_the_sweep_leaves_live_owners_kept_snapshots_and_what_is_not_ours(
    gce: GceWorld,
) -> None:
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000])
    dead_owner = _dead_owner()
    # a capture of a live process (this one), abandoned but still running
    live = gce.compute()
    live_capture = live.capture(vm)
    # a kept capture of a dead process, closed: its snapshots are a ref's
    dead = gce.compute()
    dead.owner = dead_owner
    with dead.capture(vm, keep=True) as kept:
        list(kept.blocks())
    kept_snapshots = kept.snapshot_names  # type: ignore[attr-defined]
    assert all(gce.fake.snapshot_labels(s)[KEEP_LABEL] == "true" for s in kept_snapshots)
    # a disk and a snapshot with regionvault's labels but no owner (not made by a capture)
    gce.fake.seed_disk("other-disk", labels={CAPTURE_LABEL: "vcu-0", WORKER_LABEL: WORKER})
    gce.fake.seed_snapshot("other-snap", "vcu-0-0", labels={CAPTURE_LABEL: "vcu-0"})
    # an owner label of a dead process, but another worker's
    other = gce.compute(worker_instance="rv-other-worker")
    other.owner = dead_owner
    gce.fake.seed_snapshot(
        "other-worker-snap", "vcu-0-0", labels=other._temporary_labels(CAPTURE_LABEL, "vcu-0")
    )
    before = gce.leftovers()
    assert gce.compute().sweep() == []
    assert gce.leftovers() == before
    live_capture.close()
    assert set(gce.leftovers()["snapshots"]) == {*kept_snapshots, "other-snap", "other-worker-snap"}


def test_a_sweep_that_cannot_list_logs_and_lets_the_capture_run(
    gce: GceWorld, caplog: pytest.LogCaptureFixture
) -> None:
    compute = gce.compute(sdk_retries=0)
    vm = gce.seed("vcu-0", disks=[b"boot" * 1000])
    gce.fake.fail_next("disks.list", 403, reason="forbidden", message="compute.disks.list")
    logger = "regionvault.providers.gcp.compute"
    with caplog.at_level(logging.WARNING, logger=logger), compute.capture(vm) as capture:
        list(capture.blocks())
    assert "compute.disks.list" in caplog.text
    assert gce.leftovers() == CLEAN


# --------------------------------------------------------------------------- names and types


@pytest.mark.parametrize("name", ["web\n", "vcu-0\n", "a" * 63 + "\n"])
def test_a_name_with_a_trailing_newline_is_refused_here(gce: GceWorld, name: str) -> None:
    compute = gce.compute()
    gce.seed("vcu-0")
    with pytest.raises(InstanceNotFound):
        compute.get_instance(name)
    assert gce.fake.counts["instances.get"] == 0


def test_a_machine_type_the_zone_lacks_is_refused_and_leaves_nothing(gce: GceWorld) -> None:
    compute = gce.compute()
    gce.fake.machine_types = {"e2-standard-2"}
    spec = LaunchSpec(name="vdu-2", extra={"machine_type": "n2-highmem-4"})
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=1 << 20)
    sink.write(0, b"z" * (1 << 20))
    sink.commit()
    with pytest.raises(ComputeError, match="n2-highmem-4' does not exist in zone"):
        compute.launch(spec, sink)
    sink.discard()
    assert gce.leftovers() == CLEAN
    assert "vdu-2" not in gce.fake.instance_names()


@pytest.mark.parametrize("name", ["vdu-3", "Web Server 1"])
def test_a_restore_disk_names_the_instance_its_launch_makes(gce: GceWorld, name: str) -> None:
    compute = gce.compute()
    spec = LaunchSpec(name=name, tags=Tags({"backup": "1-7"}))
    sink = compute.open_restore_sink(spec, CaptureKind.BLOCKS, size=1 << 20)
    assert isinstance(sink, GceBlockSink)
    label = gce.fake.disk_labels(sink.disk_names[0])[RESTORE_LABEL]
    sink.write(0, b"w" * (1 << 20))
    sink.commit()
    launched = compute.launch(spec, sink)
    assert launched.name == name
    assert label == launched.extra["gce_name"] == launched.id
